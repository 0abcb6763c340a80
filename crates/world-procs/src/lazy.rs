//! Lazy restore: a tree restored without its private anonymous memory, whose pages are served
//! from the store on demand, each checked against its digest before it is handed to the kernel.
//!
//! The pieces, for one restore:
//!
//! ```text
//!  criu restore --lazy-pages ──pid + userfaultfd per task──▶ pf's lazy-pages daemon (a thread)
//!  (the tree runs at once;       (lazy-pages.socket in          faults: UFFDIO_COPY of the page
//!   a touched page faults)        its --work-dir)               and the next 15 from PagesReader
//!                                                               (frame decoded, pages hashed);
//!                                                               then the rest, ≤ 4 MiB a step
//! ```
//!
//! - **Images.** [`extract`] unpacks the small image files, then rewrites every task's
//!   `pagemap-<pid>.img`: runs of pages inside areas CRIU can fill through userfaultfd
//!   ([`Vma::can_be_lazy`]) become `PE_LAZY` (not in the pages file), the rest stay `PE_PRESENT`
//!   and only those pages are written to `pages-<N>.img` (checked, as in an eager restore). Pages
//!   files no task pagemap names (shared memory) are rebuilt whole.
//! - **Serving.** pf is the lazy-pages daemon (what `criu lazy-pages` is, criu/uffd.c): the
//!   restore connects to `lazy-pages.socket` in its work directory and sends, per task, its pid
//!   in the images (an `i32`; a zombie's is negative) and its userfaultfd (`SCM_RIGHTS`), then
//!   `LAZY_PAGES_RESTORE_FINISHED`. pf answers each fault with the page and the next ones of
//!   its run (`UFFDIO_COPY`), zeros where the snapshot had no page (`UFFDIO_ZEROPAGE`), follows
//!   the tree's forks (a new userfaultfd with the parent's missing pages), `mremap`s,
//!   `madvise` removals (unregistered: zeros from then on) and unmaps, and once the restore is
//!   over copies in the rest in steps of up to 4 MiB (64 KiB after a fault, doubling with each
//!   step no fault interrupts), the trees of one process taking turns. When no
//!   page is missing it closes the userfaultfds: the tree owes pf nothing. One page cache
//!   ([`LazyMemory`]) serves every copy restored from the same images.
//! - **Never wrong memory, never a hang.** A lazily restored task that touches a missing page
//!   waits in the kernel until pf copies it in; if its userfaultfd closed first, the kernel
//!   would hand it zeros. So the tree always dies before its userfaultfds close:
//!   - a page that fails its hash is not copied: the tree is killed, and gone, before pf lets
//!     go of any userfaultfd;
//!   - dropping the [`Serving`] handle while pages are owed kills the tree first;
//!   - if pf itself dies (even SIGKILL), its own copies of the userfaultfds close, but a copy
//!     of each was sent into a socket whose receiving end the restore's namespace init holds
//!     (descriptors in flight stay open while the socket does). The init sees pf's lifeline
//!     close, kills everything in the namespace and reaps it before it exits and lets go of
//!     the socket: a waiting task dies waiting. pf drains that socket itself once every page
//!     is in.
//!
//!   Only restores into a new pid namespace can be lazy (that init is what makes this hold).

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use pf_core::pages::{PagesError, PagesReader};
use pf_core::{BlobStore, Digest256};

use crate::error::{Error, Result};
use crate::images::{PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, Vma};
use crate::wire::{CriuProcs, PagesImage};

const PAGE: u64 = 4096;
/// `1 << MADV_DONTFORK` and `1 << MADV_WIPEONFORK` in a VMA's `madv` bitmap.
const MADV_DONTFORK: u64 = 1 << 10;
const MADV_WIPEONFORK: u64 = 1 << 18;
/// The most pages read at once.
const MAX_REQUEST_PAGES: u64 = 1024;
/// Pages read per thread when a read is large.
const SPLIT_PAGES: u64 = 64;
/// Held while a background step (4 MiB) is read, checked and copied in: the trees this
/// process serves take turns, leaving a core for restores and for the faults of the others.
static BACKGROUND: Mutex<()> = Mutex::new(());
/// How long a daemon that must kill the tree waits for the restore to say what the tree is.
const KILLER_WAIT: Duration = Duration::from_secs(300);

/// One run of lazily served pages: `pages` pages from `vaddr`, which are pages `first..` of the
/// task's pages file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    vaddr: u64,
    pages: u64,
    first: u64,
}

/// The memory of one task that is served on demand.
#[derive(Debug)]
struct TaskMemory {
    file: String,
    pages: Arc<PagesReader<'static>>,
    /// By address, not overlapping.
    runs: Vec<Run>,
    /// Areas (at their addresses in the images) a forked child does not get the task's pages
    /// of: `MADV_DONTFORK` (not inherited) and `MADV_WIPEONFORK` (inherited empty).
    not_inherited: Vec<(u64, u64)>,
}

/// The run of `runs` (by address, not overlapping) holding `vaddr`, and how far into it
/// `vaddr` is (in pages).
fn find_run(runs: &[Run], vaddr: u64) -> Option<(Run, u64)> {
    let i = runs.partition_point(|r| r.vaddr <= vaddr).checked_sub(1)?;
    let run = runs[i];
    let off = (vaddr - run.vaddr) / PAGE;
    (vaddr.is_multiple_of(PAGE) && off < run.pages).then_some((run, off))
}

/// What a lazy restore serves: every task's lazily restored pages, where they are in the store.
/// Shared by every copy restored from the same images (one page cache for all of them).
#[derive(Debug)]
pub(crate) struct LazyMemory {
    snapshot: Digest256,
    /// The store the pages come from (each daemon holds a share of its lock while it serves).
    store: Arc<dyn BlobStore>,
    tasks: HashMap<u64, TaskMemory>,
    lazy_pages: u64,
    /// Where the hint of the pages thaws touch first is kept (None: the store keeps none).
    hot_path: Option<std::path::PathBuf>,
    /// Pages loaded eagerly because the hint named them.
    hot_pages: u64,
    /// Pages faulted in within [`HOT_WINDOW`] of a thaw, by pages file, not yet saved.
    touched: Mutex<HashMap<String, std::collections::BTreeSet<u64>>>,
    /// Restores from these images under way: background copying waits for them (the trees of
    /// a fork all run sooner; faults are served meanwhile).
    restoring: std::sync::atomic::AtomicUsize,
}

impl LazyMemory {
    /// The store its pages come from.
    pub(crate) fn store(&self) -> &dyn BlobStore {
        self.store.as_ref()
    }

    /// The snapshot it is the memory of.
    pub(crate) fn snapshot(&self) -> &Digest256 {
        &self.snapshot
    }

    /// A pack its pages are in that the store no longer holds, nor any pack a repack moved its
    /// pages to, if any: looked at before a restore, so that a tree never runs on memory that
    /// cannot be served. Looked up afresh (not where an earlier thaw found the pages: a repack
    /// since may have moved them on); a pack that cannot be looked up is left to the serve to
    /// report.
    pub(crate) fn missing_pack(&self) -> Option<Digest256> {
        let mut seen = std::collections::HashSet::new();
        for task in self.tasks.values() {
            let pages = &task.pages;
            for (_, n, _) in pages.packs_by_first_use() {
                let Some(pack) = pages.pack(n) else { continue };
                if !seen.insert(pack) {
                    continue;
                }
                match pf_core::forward::locate(self.store.as_ref(), &pack) {
                    Ok(pf_core::forward::Located::Missing { .. }) => return Some(pack),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%pack, error = %e, "cannot tell where a pack is"),
                }
            }
        }
        None
    }
}

/// A restore from a [`LazyMemory`]'s images under way ([`LazyMemory::restoring`]).
pub(crate) struct Restoring<'a>(&'a LazyMemory);

impl Drop for Restoring<'_> {
    fn drop(&mut self) {
        self.0
            .restoring
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A hint of the pages thaws of a snapshot touched first: `{"kind":"pf.hot_pages.v1",
/// "files":{"pages-1.img":[page numbers …]}}` in `<store>/index/hot/<snapshot hex>`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename = "pf.hot_pages.v1")]
struct HotPages {
    files: std::collections::BTreeMap<String, Vec<u64>>,
}

/// The kind of store hint lazy thaws keep.
const HOT_HINT: &str = pf_core::hint::HOT;
/// Faults within this long of a thaw count as the snapshot's working set.
const HOT_WINDOW: Duration = Duration::from_secs(2);
/// At most this many pages (64 MiB) are loaded eagerly because of the hint.
const HOT_MAX: usize = 16_384;

impl HotPages {
    /// The hint at `path`, or an empty one when there is none or it does not parse (a hint is
    /// never trusted: a bad one only costs speed).
    fn load(path: Option<&Path>) -> HotPages {
        let Some(path) = path else {
            return HotPages::default();
        };
        let mut hint = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::debug!(path = %path.display(), error = %e, "ignoring a malformed hint");
                HotPages::default()
            }),
            Err(_) => HotPages::default(),
        };
        // Whatever the file says: sorted, once each, and bounded.
        for pages in hint.files.values_mut() {
            pages.sort_unstable();
            pages.dedup();
            pages.truncate(HOT_MAX);
        }
        hint
    }
}

impl LazyMemory {
    /// Pages served on demand (over all tasks).
    pub(crate) fn lazy_pages(&self) -> u64 {
        self.lazy_pages
    }

    /// Pages loaded eagerly because earlier thaws touched them first.
    pub(crate) fn hot_pages(&self) -> u64 {
        self.hot_pages
    }

    /// Say that a restore from these images is under way, until the guard is dropped.
    pub(crate) fn restoring(&self) -> Restoring<'_> {
        self.restoring
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Restoring(self)
    }

    /// Remember that a thaw faulted in page `vaddr` of task `pid` early.
    fn touched(&self, pid: u64, vaddr: u64) {
        let Some(task) = self.tasks.get(&pid) else {
            return;
        };
        let Some((run, off)) = find_run(&task.runs, vaddr) else {
            return;
        };
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched
            .entry(task.file.clone())
            .or_default()
            .insert(run.first + off);
    }

    /// Add the pages touched early to the snapshot's hint (best effort: a hint that cannot be
    /// written only costs the next thaw some speed).
    fn save_hot(&self) {
        let Some(path) = &self.hot_path else {
            return;
        };
        let touched = std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()));
        if touched.is_empty() {
            return;
        }
        let mut hint = HotPages::load(Some(path));
        let mut total: usize = hint.files.values().map(Vec::len).sum();
        for (file, pages) in touched {
            let entry = hint.files.entry(file).or_default();
            let mut all: std::collections::BTreeSet<u64> = entry.iter().copied().collect();
            for p in pages {
                if total >= HOT_MAX {
                    break;
                }
                if all.insert(p) {
                    total += 1;
                }
            }
            *entry = all.into_iter().collect();
        }
        if let Err(e) = pf_core::hint::write(path, &serde_json::to_vec(&hint).unwrap_or_default()) {
            tracing::debug!(path = %path.display(), error = %e, "cannot save the hot pages hint");
        }
    }

    /// Fill `out` with the pages from `vaddr` of task `pid` (at most the rest of their run):
    /// how many pages were read.
    fn read(&self, pid: u64, vaddr: u64, want: u64, out: &mut Vec<u8>) -> Result<u64> {
        let task = self.tasks.get(&pid).ok_or_else(|| Error::LazyFailed {
            snapshot: self.snapshot,
            reason: format!("pages of pid {pid} were asked for, but it has no lazy memory"),
        })?;
        let (run, off) = find_run(&task.runs, vaddr).ok_or_else(|| Error::LazyFailed {
            snapshot: self.snapshot,
            reason: format!(
                "pid {pid}'s page at {vaddr:#x} was asked for, but it is not lazy memory"
            ),
        })?;
        let n = want.min(run.pages - off).min(MAX_REQUEST_PAGES);
        let first = run.first + off;
        out.resize((n * PAGE) as usize, 0);
        let read = |first: u64, buf: &mut [u8]| {
            task.pages.read(first, buf).map_err(|source| {
                read_error(&self.snapshot, &task.file, first, source, |page| {
                    Some(run.vaddr + (page - run.first) * PAGE)
                })
            })
        };
        if n <= SPLIT_PAGES {
            read(first, out)?;
        } else {
            // One part per core (at least SPLIT_PAGES each): a thread costs what hashing a few
            // pages does.
            let cores = crate::v2::threads() as u64;
            let per = n.div_ceil(cores).max(SPLIT_PAGES);
            let chunk = (per * PAGE) as usize;
            std::thread::scope(|scope| {
                let jobs: Vec<_> = out
                    .chunks_mut(chunk)
                    .enumerate()
                    .map(|(i, buf)| {
                        let at = first + i as u64 * per;
                        scope.spawn(move || read(at, buf))
                    })
                    .collect();
                jobs.into_iter().try_for_each(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(Error::Sys {
                            op: "reading pages to serve",
                            source: std::io::Error::other("a reader thread panicked"),
                        })
                    })
                })
            })?;
        }
        Ok(n)
    }
}

/// Whether `name` is a task's pagemap (`pagemap-<pid>.img`, not shared memory's), and its pid.
fn task_pagemap(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("pagemap-")?.strip_suffix(".img")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Split the present runs of `map` at the edges of `vmas`: runs inside areas that can be lazy
/// become `PE_LAZY` [`Run`]s; the rest stay present. Returns the new pagemap, the lazy runs
/// and the page ranges (first, count) of the old pages file that stay in it, in order.
fn split(map: &Pagemap, vmas: &[Vma], hot: &[u64]) -> (Pagemap, Vec<Run>, Vec<(u64, u64)>) {
    let mut entries: Vec<PagemapEntry> = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    let mut kept: Vec<(u64, u64)> = Vec::new();
    let mut page = 0u64;
    let push = |entries: &mut Vec<PagemapEntry>, e: PagemapEntry| match entries.last_mut() {
        Some(last) if last.flags == e.flags && last.vaddr + last.nr_pages * PAGE == e.vaddr => {
            last.nr_pages += e.nr_pages;
        }
        _ => entries.push(e),
    };
    for e in &map.entries {
        if e.flags & PE_PRESENT == 0 {
            push(&mut entries, *e);
            continue;
        }
        let end = e.vaddr + e.nr_pages * PAGE;
        let mut at = e.vaddr;
        while at < end {
            let i = vmas.partition_point(|v| v.start <= at);
            let (seg_end, lazy) = match i.checked_sub(1).map(|j| vmas[j]) {
                // CRIU's own choice first: it never marks the page under a thread's stack
                // pointer lazy (criu/mem.c `is_stack`), and marks the rest of a lazy-capable
                // area `PE_LAZY` in every dump.
                Some(v) if at < v.end => {
                    (end.min(v.end), v.can_be_lazy() && e.flags & PE_LAZY != 0)
                }
                _ => (end.min(vmas.get(i).map_or(end, |v| v.start)), false),
            };
            let mut n = (seg_end - at).div_ceil(PAGE);
            // A page a thaw touched first (the hint) is loaded with the rest of the eager
            // memory: split the lazy segment at the first hot page in it.
            let mut lazy = lazy;
            if lazy {
                let h = hot.partition_point(|&p| p < page);
                match hot.get(h) {
                    Some(&p) if p == page => {
                        let run = hot[h..]
                            .iter()
                            .enumerate()
                            .take_while(|&(k, &q)| q == page + k as u64 && (k as u64) < n)
                            .count();
                        lazy = false;
                        n = run as u64;
                    }
                    Some(&p) if p < page + n => n = p - page,
                    _ => {}
                }
            }
            if lazy {
                push(
                    &mut entries,
                    PagemapEntry {
                        vaddr: at,
                        nr_pages: n,
                        flags: PE_LAZY,
                    },
                );
                match runs.last_mut() {
                    Some(r) if r.vaddr + r.pages * PAGE == at && r.first + r.pages == page => {
                        r.pages += n;
                    }
                    _ => runs.push(Run {
                        vaddr: at,
                        pages: n,
                        first: page,
                    }),
                }
            } else {
                // Present, and not lazy: CRIU marks pages of lazy-capable areas `PE_LAZY` in
                // every dump, and a lazy restore skips those.
                push(
                    &mut entries,
                    PagemapEntry {
                        vaddr: at,
                        nr_pages: n,
                        flags: e.flags & !PE_LAZY,
                    },
                );
                match kept.last_mut() {
                    Some((first, count)) if *first + *count == page => *count += n,
                    _ => kept.push((page, n)),
                }
            }
            page += n;
            at += n * PAGE;
        }
    }
    let map = Pagemap {
        pages_id: map.pages_id,
        entries,
    };
    (map, runs, kept)
}

/// Extract a v2 snapshot's images into `dest` for a lazy restore (see the module doc) and
/// return what must be served.
pub(crate) fn extract(
    store: &Arc<dyn BlobStore>,
    snapshot: &Digest256,
    procs: &CriuProcs,
    memory: &[PagesImage],
    dest: &Path,
) -> Result<LazyMemory> {
    let source = store
        .open(&procs.criu_dump)
        .map_err(|e| Error::store(format!("opening the images {}", procs.criu_dump), e))?;
    crate::tarball::extract(source, &procs.criu_dump, dest)?;
    let manifests: HashMap<&str, &PagesImage> =
        memory.iter().map(|m| (m.file.as_str(), m)).collect();
    let mut tasks = HashMap::new();
    let mut claimed = std::collections::HashSet::new();
    let mut lazy_pages = 0;
    let hot_path = store.hint_path(HOT_HINT, snapshot);
    let hint = HotPages::load(hot_path.as_deref());
    let mut hot_pages = 0;
    let mut names: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dest)
        .map_err(|e| Error::io("list", dest, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| task_pagemap(&e.file_name().to_string_lossy()).map(|pid| (pid, e.path())))
        .collect();
    names.sort();
    for (pid, path) in names {
        let image_err = |source| Error::Image {
            what: "the memory map (pagemap-*.img, mm-*.img)",
            source,
        };
        let map = crate::images::pagemap(&path).map_err(image_err)?;
        let file = format!("pages-{}.img", map.pages_id);
        let Some(image) = manifests.get(file.as_str()) else {
            continue;
        };
        let vmas =
            crate::images::mm_vmas(&dest.join(format!("mm-{pid}.img"))).map_err(image_err)?;
        let reader =
            PagesReader::open_shared(Arc::clone(store), &image.manifest).map_err(|source| {
                Error::Pages {
                    what: format!("opening the memory of pid {pid} ({file})"),
                    source: Box::new(source),
                }
            })?;
        tracing::debug!(pid, pages = reader.pages(), "page list read");
        let hot = hint.files.get(&file).map_or(&[][..], Vec::as_slice);
        let hot = &hot[..hot.len().min(HOT_MAX)];
        let (new_map, runs, kept) = split(&map, &vmas, hot);
        let kept_pages: u64 = kept.iter().map(|&(_, n)| n).sum();
        hot_pages += kept_pages.min(hot.len() as u64);
        let not_inherited = vmas
            .iter()
            .filter(|v| v.madv & (MADV_DONTFORK | MADV_WIPEONFORK) != 0)
            .map(|v| (v.start, v.end))
            .collect();
        let task = TaskMemory {
            file: file.clone(),
            pages: Arc::new(reader),
            runs,
            not_inherited,
        };
        write_kept(snapshot, &task, &map, &kept, &dest.join(&file))?;
        crate::images::write_pagemap(&path, &new_map).map_err(image_err)?;
        lazy_pages += task.runs.iter().map(|r| r.pages).sum::<u64>();
        tracing::debug!(pid, file = %file, lazy = task.runs.len(), kept = kept.len(), "lazy memory");
        claimed.insert(file);
        tasks.insert(pid, task);
    }
    let rest: Vec<PagesImage> = memory
        .iter()
        .filter(|m| !claimed.contains(&m.file))
        .cloned()
        .collect();
    crate::v2::rebuild_pages_files(store.as_ref(), procs, &rest, dest)?;
    Ok(LazyMemory {
        snapshot: *snapshot,
        store: Arc::clone(store),
        tasks,
        lazy_pages,
        hot_path,
        hot_pages,
        touched: Mutex::new(HashMap::new()),
        restoring: std::sync::atomic::AtomicUsize::new(0),
    })
}

/// Write the pages that stay in the pages file (`kept` ranges of the old file, in order) to a
/// new `path`, each checked.
///
/// They are read on every core: kept pages (the hint's hot pages, memory that cannot be lazy)
/// lie scattered over the snapshot, so nearly each run costs a frame decoded for a few of its
/// pages, and this runs before criu starts, with the cores otherwise idle (64 MiB goblin, 1,600
/// kept pages in 160 runs: 28 ms on one core).
fn write_kept(
    snapshot: &Digest256,
    task: &TaskMemory,
    map: &Pagemap,
    kept: &[(u64, u64)],
    path: &Path,
) -> Result<()> {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    let out = std::fs::File::options()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    // Pieces of at most 256 pages: (first page in the old file, pages, offset in the new one).
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    for &(first, count) in kept {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(256);
            pieces.push((first + done, n, offset));
            offset += n * PAGE;
            done += n;
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    // The failure of the earliest piece that failed, so the error is the same whatever the
    // threads' order.
    let failed: Mutex<Option<(usize, Error)>> = Mutex::new(None);
    let work = || {
        let mut buf = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(first, n, at)) = pieces.get(i) else {
                return;
            };
            if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                return;
            }
            buf.resize((n * PAGE) as usize, 0);
            let result = task
                .pages
                .read(first, &mut buf)
                .map_err(|source| {
                    read_error(snapshot, &task.file, first, source, |page| {
                        map.address_of(page)
                    })
                })
                .and_then(|()| {
                    out.write_all_at(&buf, at)
                        .map_err(|e| Error::io("write", path, e))
                });
            if let Err(e) = result {
                let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                if f.as_ref().is_none_or(|(j, _)| i < *j) {
                    *f = Some((i, e));
                }
                return;
            }
        }
    };
    let threads = crate::v2::threads().clamp(1, pieces.len().max(1));
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// How a lazy restore's serving ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LazyOutcome {
    /// Every page is in: the tree owes pf nothing.
    Complete,
    /// Serving failed and the tree was killed; why.
    Failed(String),
}

/// What the server, the daemon's watcher and the restore share.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<SharedState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct SharedState {
    outcome: Option<LazyOutcome>,
    /// The first error, kept whole for the caller.
    error: Option<Error>,
    /// How to kill the restored tree, once the restore has said.
    killer: Option<Killer>,
    /// The restore failed: there is no tree to kill.
    abandoned: bool,
    /// The tree is known to be gone (killed and waited for, or never made): its userfaultfds
    /// may close.
    tree_gone: bool,
    pages_served: u64,
}

/// How to kill a restored tree from another thread.
#[derive(Debug)]
pub(crate) enum Killer {
    /// Its namespace's init, by pidfd: SIGKILL takes the namespace down.
    Init(OwnedFd),
}

/// How long a killed tree may take to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

impl Killer {
    /// SIGKILL the tree and wait (bounded) until it is gone: the init's pidfd turns readable
    /// only once the init has exited, which a namespace init does after every other process in
    /// the namespace has. Whether it is gone.
    fn kill(&self) -> bool {
        match self {
            Killer::Init(pidfd) => {
                let _ = pf_os::fd::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                let gone = wait_readable(pidfd, KILL_WAIT);
                if !gone {
                    tracing::warn!(
                        "a killed lazily restored tree did not end within {KILL_WAIT:?}"
                    );
                }
                gone
            }
        }
    }
}

impl Shared {
    /// Record that serving failed with `error` and kill the tree, waiting (bounded) for the
    /// restore to say what the tree is when it has not yet. The faulting task waits for its
    /// page meanwhile, so nothing runs on memory pf did not serve.
    fn fail(&self, error: Error) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(state.outcome, Some(LazyOutcome::Complete)) || state.abandoned {
            // Done, or ended by its owner (who killed the tree first): nothing more to say.
            tracing::debug!(error = %error, "lazy serving ended");
            return;
        }
        // The owner reports the error (the goblin's wait names it): not said twice.
        tracing::info!(error = %error, "lazy restore failed; killing the restored tree");
        if state.outcome.is_none() {
            state.outcome = Some(LazyOutcome::Failed(error.to_string()));
            state.error = Some(error);
        }
        let deadline = std::time::Instant::now() + KILLER_WAIT;
        while state.killer.is_none() && !state.abandoned {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some(killer) = &state.killer {
            state.tree_gone = killer.kill();
        }
        self.changed.notify_all();
    }

    /// Whether the tree is known to be gone.
    fn tree_gone(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.tree_gone)
    }

    fn complete(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        tracing::info!(
            pages = state.pages_served,
            "lazy restore done: the tree needs no more pages"
        );
        if state.outcome.is_none() {
            state.outcome = Some(LazyOutcome::Complete);
        }
        self.changed.notify_all();
    }

    /// The owner ended serving (the tree is dead, or was never made).
    fn abandoned(&self) -> bool {
        self.state.lock().map_or(true, |s| s.abandoned)
    }

    fn served(&self, pages: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pages_served += pages;
    }
}

/// The serving side of one lazy restore: pf's lazy-pages daemon, on a thread of its own. Held
/// by the restored tree's handle.
#[derive(Debug)]
pub(crate) struct Serving {
    snapshot: Digest256,
    /// The images the restore reads stay until serving is over.
    _images: Arc<crate::restore::ImagesDir>,
    shared: Arc<Shared>,
    /// Closed to make the daemon end (the tree is dead, or was never made).
    wake: Option<OwnedFd>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The daemon listening; `work_dir` is where the restore must run (`--work-dir`: CRIU connects
/// to `lazy-pages.socket` there).
pub(crate) struct Started {
    pub(crate) serving: Serving,
    pub(crate) work_dir: std::path::PathBuf,
    /// The receiving end of the socket a copy of every userfaultfd is sent into, for the
    /// namespace init to hold (`InitPlan::hold`): while it does, none of the tree's
    /// userfaultfds can close.
    pub(crate) hold: OwnedFd,
}

/// What CRIU sends when the restore is over (`LAZY_PAGES_RESTORE_FINISHED`, "RSTF"): larger
/// than any pid, so it is told apart from the pids it sends before it.
const RESTORE_FINISHED: i32 = 0x5253_5446;
/// Pages copied in per background step: at most 4 MiB; after a fault, 64 KiB (a fault waits
/// for the step under way), doubling with every step that no fault interrupts.
const BACKGROUND_PAGES: u64 = 1024;
/// … and from a faulting address on (64 KiB): the pages after a touched one are often next.
const FAULT_PAGES: u64 = 16;
/// The userfaultfd keeper's send buffer.
const KEEP_BUFFER: usize = 8 << 20;
/// How long the daemon waits for the restore to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(300);
/// How long a daemon whose background step was held back waits for events before it tries
/// again (ms).
const HELD_BACK_MS: u8 = 1;
/// How often a waiting daemon looks at the clock.
const TICK: Duration = Duration::from_millis(100);

/// Start pf's lazy-pages daemon for one restore of `memory` (see the module doc).
pub(crate) fn start(
    memory: Arc<LazyMemory>,
    images: Arc<crate::restore::ImagesDir>,
) -> Result<Started> {
    let sys = |op| move |source| Error::Sys { op, source };
    let dir = crate::capture::scratch_dir("pf-lazy-")?;
    let path = dir.path().join("lazy-pages.socket");
    let listener = UnixListener::bind(&path).map_err(|e| Error::io("listen on", &path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set up", &path, e))?;
    let (keep, held) = UnixStream::pair().map_err(sys("creating the userfaultfd keeper"))?;
    // Each copy in flight takes about 1 KiB of the sender's buffer: room for thousands (a tree
    // that forks more while its memory is served is killed with a clear error), never a block.
    let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(&keep, KEEP_BUFFER);
    keep.set_nonblocking(true)
        .map_err(sys("setting up the userfaultfd keeper"))?;
    let drain = held
        .try_clone()
        .map_err(sys("duplicating the userfaultfd keeper"))?;
    let (woken, wake) = std::io::pipe().map_err(sys("creating the daemon's wake-up pipe"))?;
    let shared = Arc::new(Shared::default());
    let snapshot = memory.snapshot;
    let work_dir = dir.path().to_owned();
    // A share of the store's lock, from before the tree exists until serving ends: gc waits
    // for it rather than sweep the packs of a snapshot whose name was removed meanwhile.
    let reading = ServeShare::take(&memory.store);
    let daemon = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pf-lazy-pages".into())
            .spawn(move || {
                let _dir = dir;
                let _reading = reading;
                let mut daemon = Daemon {
                    memory: &memory,
                    shared: &shared,
                    woken: woken.into(),
                    keep,
                    drain,
                    tasks: Vec::new(),
                    faults: std::collections::VecDeque::new(),
                    finished: false,
                    started: std::time::Instant::now(),
                    buf: Vec::with_capacity((BACKGROUND_PAGES * PAGE) as usize),
                    next: 0,
                    step: FAULT_PAGES,
                    held_back: false,
                };
                let complete = match daemon.run(&listener) {
                    Ok(complete) => complete,
                    Err(e) => {
                        // The tree dies (and is gone) before any of its userfaultfds closes: a
                        // task waiting for a page must never get the kernel's zeros instead.
                        shared.fail(e);
                        false
                    }
                };
                if complete || shared.tree_gone() {
                    daemon.release();
                } else {
                    // Not known to be gone: its userfaultfds stay open for good (a waiting task
                    // dies waiting if it ever dies), at the cost of a few descriptors.
                    tracing::warn!(
                        "a lazily restored tree was not seen to end: keeping its userfaultfds open"
                    );
                    daemon.buf = Vec::new();
                    std::mem::forget(daemon);
                }
                if complete {
                    shared.complete();
                }
                memory.save_hot();
            })
            .map_err(sys("starting the lazy-pages daemon thread"))?
    };
    Ok(Started {
        serving: Serving {
            snapshot,
            _images: images,
            shared,
            wake: Some(wake.into()),
            threads: vec![daemon],
        },
        work_dir,
        hold: held.into(),
    })
}

/// A lazy-pages daemon's share of the store's lock ([`BlobStore::reader_lock`]), let go when
/// dropped. Taken at once when no gc holds the lock; while one does, a thread waits for it to
/// let go and then takes the share, so a gc begun later waits for the serve (the serve goes on
/// meanwhile: the gc under way chose what stays from the names it read before).
struct ServeShare {
    slot: Arc<Mutex<ShareSlot>>,
}

#[derive(Default)]
struct ShareSlot {
    lock: Option<pf_core::StoreLock>,
    /// Serving is over: a share taken late is let go at once.
    done: bool,
}

impl ServeShare {
    fn take(store: &Arc<dyn BlobStore>) -> Self {
        let slot = Arc::new(Mutex::new(ShareSlot::default()));
        if let Some(lock) = store.reader_lock() {
            slot.lock().unwrap_or_else(|p| p.into_inner()).lock = Some(lock);
            return Self { slot };
        }
        let store = Arc::clone(store);
        let waiting = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("pf-lazy-share".into())
            .spawn(move || {
                // Blocks while the gc holds the lock (a store on a read-only mount too); fails
                // at once only where there is no lock to take, as `reader_lock` did.
                let lock = store.reader_lock_wait();
                let mut slot = waiting.lock().unwrap_or_else(|p| p.into_inner());
                match lock {
                    Ok(lock) if !slot.done => slot.lock = Some(lock),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "serving without a share of the lock"),
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no thread to wait for the store's lock");
        }
        Self { slot }
    }
}

impl Drop for ServeShare {
    fn drop(&mut self) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.done = true;
        slot.lock = None;
    }
}

/// Fill `buf` from `sock`: `Ok(false)` at end of file before the first byte.
fn read_full(sock: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Whether `fd` becomes readable (or hits end of file) within `timeout`.
fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return false,
            Ok(0) => continue,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// One userfaultfd: a process of the tree (or a child it forked since) and the lazy memory it
/// still lacks.
struct Task {
    /// `None` once the process is gone (its address space released).
    uffd: Option<OwnedFd>,
    /// Its pid in the images (a forked child keeps its parent's: its memory is the parent's).
    pid: u64,
    /// Missing pages: start address → (end, where those pages were in the images), not
    /// overlapping.
    missing: BTreeMap<u64, (u64, u64)>,
}

impl Task {
    /// The process is gone: nothing more to serve, and its userfaultfd can close.
    fn gone(&mut self) {
        self.missing.clear();
        self.uffd = None;
    }
}

/// pf's lazy-pages daemon for one restore.
struct Daemon<'a> {
    memory: &'a LazyMemory,
    shared: &'a Shared,
    woken: OwnedFd,
    /// Sends a copy of every userfaultfd into the socket the namespace init holds.
    keep: UnixStream,
    /// Our own copy of that socket's receiving end: drained when serving is over, so the
    /// copies close.
    drain: UnixStream,
    tasks: Vec<Task>,
    /// Faults read but not served yet: (task, page address).
    faults: std::collections::VecDeque<(usize, u64)>,
    /// CRIU said the restore is over: the tree runs, background copying may start.
    finished: bool,
    started: std::time::Instant,
    buf: Vec<u8>,
    /// The task whose turn it is in the background.
    next: usize,
    /// Pages in the next background step.
    step: u64,
    /// The last background step could not run (a restore under way, another tree's turn).
    held_back: bool,
}

/// Remove `[start, end)` from `missing`.
fn drop_range(missing: &mut BTreeMap<u64, (u64, u64)>, start: u64, end: u64) {
    let hit: Vec<(u64, (u64, u64))> = missing
        .range(..end)
        .rev()
        .take_while(|(_, (e, _))| *e > start)
        .map(|(s, v)| (*s, *v))
        .collect();
    for (s, (e, img)) in hit {
        missing.remove(&s);
        if s < start {
            missing.insert(s, (start, img));
        }
        if e > end {
            missing.insert(end, (e, img + (end - s)));
        }
    }
}

/// Move what is missing in `[from, from + len)` to `to` (an `mremap`).
fn move_range(missing: &mut BTreeMap<u64, (u64, u64)>, from: u64, to: u64, len: u64) {
    let end = from.saturating_add(len);
    let mut moved = BTreeMap::new();
    let inside: Vec<(u64, (u64, u64))> = missing
        .range(..end)
        .rev()
        .take_while(|(_, (e, _))| *e > from)
        .map(|(s, v)| (*s, *v))
        .collect();
    for (s, (e, img)) in inside {
        let (s2, e2) = (s.max(from), e.min(end));
        moved.insert(to + (s2 - from), (to + (e2 - from), img + (s2 - s)));
    }
    drop_range(missing, from, end);
    drop_range(missing, to, to.saturating_add(len));
    missing.extend(moved);
}

/// Remove from `missing` the pages that were at `[start, end)` in the images, wherever they
/// are now.
fn drop_image_range(missing: &mut BTreeMap<u64, (u64, u64)>, start: u64, end: u64) {
    let hit: Vec<(u64, u64)> = missing
        .iter()
        .filter_map(|(&s, &(e, img))| {
            let (a, b) = (start.max(img), end.min(img + (e - s)));
            (a < b).then(|| (s + (a - img), s + (b - img)))
        })
        .collect();
    for (a, b) in hit {
        drop_range(missing, a, b);
    }
}

/// The missing run holding `addr`: (start, end, image address of start).
fn missing_at(missing: &BTreeMap<u64, (u64, u64)>, addr: u64) -> Option<(u64, u64, u64)> {
    let (&s, &(e, img)) = missing.range(..=addr).next_back()?;
    (addr < e).then_some((s, e, img))
}

impl Daemon<'_> {
    fn failed(&self, reason: String) -> Error {
        Error::LazyFailed {
            snapshot: self.memory.snapshot,
            reason,
        }
    }

    /// Serve until every page is in (`Ok(true)`) or the daemon is told to stop (`Ok(false)`).
    fn run(&mut self, listener: &UnixListener) -> Result<bool> {
        let Some(mut conn) = self.accept(listener)? else {
            return Ok(false);
        };
        let mut conn_open = true;
        loop {
            // The faults read so far (one that must wait for an event comes back later).
            for _ in 0..self.faults.len() {
                let Some((task, addr)) = self.faults.pop_front() else {
                    break;
                };
                self.fault(task, addr)?;
            }
            let pending = self.tasks.iter().any(|t| !t.missing.is_empty());
            if self.finished && !pending {
                return Ok(true);
            }
            let background = self.finished && pending;
            let (woken, conn_ready, ready) = {
                let polled: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.tasks[i].uffd.is_some())
                    .collect();
                let mut fds = Vec::with_capacity(polled.len() + 2);
                fds.push(PollFd::new(self.woken.as_fd(), PollFlags::POLLIN));
                if conn_open {
                    fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
                }
                for t in self.tasks.iter().filter_map(|t| t.uffd.as_ref()) {
                    fds.push(PollFd::new(t.as_fd(), PollFlags::POLLIN));
                }
                let timeout = if background && !std::mem::take(&mut self.held_back) {
                    PollTimeout::ZERO
                } else if background {
                    PollTimeout::from(HELD_BACK_MS)
                } else {
                    PollTimeout::from(u16::try_from(TICK.as_millis()).unwrap_or(100))
                };
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(self.failed(format!("poll failed: {e}"))),
                }
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                let conn_ready = conn_open && ready(&fds[1]);
                let first = if conn_open { 2 } else { 1 };
                let tasks: Vec<usize> = polled
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| ready(&fds[first + k]))
                    .map(|(_, &i)| i)
                    .collect();
                (ready(&fds[0]), conn_ready, tasks)
            };
            if woken || self.shared.abandoned() {
                return Ok(false);
            }
            if conn_ready {
                conn_open = self.criu_message(&mut conn)?;
            }
            for i in ready {
                self.events(i)?;
            }
            if background && self.faults.is_empty() {
                self.background()?;
            }
        }
    }

    /// Wait for the restore to connect; `None` when told to stop first.
    fn accept(&self, listener: &UnixListener) -> Result<Option<UnixStream>> {
        let deadline = std::time::Instant::now() + CONNECT_WAIT;
        loop {
            let mut fds = [
                PollFd::new(self.woken.as_fd(), PollFlags::POLLIN),
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            ];
            let ms = u16::try_from(TICK.as_millis()).unwrap_or(100);
            let _ = poll(&mut fds, PollTimeout::from(ms));
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                return Ok(None);
            }
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false).map_err(|source| Error::Sys {
                        op: "setting up the restore's connection",
                        source,
                    })?;
                    return Ok(Some(conn));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(source) => {
                    return Err(Error::Sys {
                        op: "accepting the restore's connection",
                        source,
                    });
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(self.failed(format!(
                    "criu restore did not connect to pf's lazy-pages socket within {CONNECT_WAIT:?}"
                )));
            }
        }
    }

    /// Read one message of the restore: a task's pid and its userfaultfd, a zombie's negative
    /// pid, or "restore finished". Whether the connection is still open.
    fn criu_message(&mut self, conn: &mut UnixStream) -> Result<bool> {
        let mut word = [0u8; 4];
        match read_full(conn, &mut word) {
            Ok(true) => {}
            Ok(false) if self.finished => return Ok(false),
            Ok(false) => {
                return Err(
                    self.failed("criu restore hung up before the restore was over".to_owned())
                );
            }
            Err(source) => {
                return Err(Error::Sys {
                    op: "reading from the restore's connection",
                    source,
                });
            }
        }
        let pid = i32::from_ne_bytes(word);
        if pid == RESTORE_FINISHED {
            tracing::debug!(
                tasks = self.tasks.len(),
                "the restore is over: copying in the rest"
            );
            self.finished = true;
            return Ok(true);
        }
        if pid <= 0 {
            // A zombie: no memory.
            return Ok(true);
        }
        let uffd = crate::streamer::recv_fd(conn).map_err(|source| Error::Sys {
            op: "receiving a userfaultfd from the restore",
            source,
        })?;
        if !crate::uffd::is_userfaultfd(&uffd) {
            return Err(self.failed(format!(
                "criu restore sent pid {pid} something that is not a userfaultfd"
            )));
        }
        let pid = u64::try_from(pid).unwrap_or_default();
        let missing = self.memory.tasks.get(&pid).map_or_else(BTreeMap::new, |t| {
            t.runs
                .iter()
                .map(|r| (r.vaddr, (r.vaddr + r.pages * PAGE, r.vaddr)))
                .collect()
        });
        tracing::debug!(pid, runs = missing.len(), "a task's userfaultfd");
        self.adopt(pid, uffd, missing)?;
        Ok(true)
    }

    /// Serve a new userfaultfd; a copy goes into the socket the namespace init holds. If it
    /// cannot, the tree is killed (the error), pf's own copy staying open until it is gone.
    fn adopt(&mut self, pid: u64, uffd: OwnedFd, missing: BTreeMap<u64, (u64, u64)>) -> Result<()> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [uffd.as_fd()];
        let pushed = control.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = if pushed {
            sendmsg(
                &self.keep,
                &[std::io::IoSlice::new(&[0])],
                &mut control,
                SendFlags::DONTWAIT,
            )
            .map(|_| ())
        } else {
            Err(rustix::io::Errno::NOBUFS)
        };
        self.tasks.push(Task {
            uffd: Some(uffd),
            pid,
            missing,
        });
        sent.map_err(|e| {
            self.failed(format!(
                "could not hand userfaultfd number {} to the namespace init to hold ({e}): the \
                 tree made more processes than pf can serve lazily; thaw it eagerly (--eager)",
                self.tasks.len()
            ))
        })
    }

    /// Read the events of task `i`: faults are queued, the rest handled at once (the kernel
    /// holds the process until they are read).
    fn events(&mut self, i: usize) -> Result<()> {
        use crate::uffd::Event;
        loop {
            let Some(uffd) = self.tasks[i].uffd.as_ref() else {
                return Ok(());
            };
            let event = crate::uffd::read_event(uffd.as_fd()).map_err(|source| Error::Sys {
                op: "reading a userfaultfd",
                source,
            })?;
            let Some(event) = event else {
                return Ok(());
            };
            tracing::trace!(task = i, ?event, "userfaultfd event");
            match event {
                Event::PageFault { address } => self.faults.push_back((i, address & !(PAGE - 1))),
                Event::Fork { ufd } => {
                    let uffd = crate::uffd::adopt(ufd).ok_or_else(|| {
                        self.failed(format!("a fork event with descriptor {ufd}"))
                    })?;
                    let pid = self.tasks[i].pid;
                    let mut missing = self.tasks[i].missing.clone();
                    // Areas a child does not inherit (MADV_DONTFORK) or gets empty
                    // (MADV_WIPEONFORK): nothing of the parent's goes there.
                    if let Some(task) = self.memory.tasks.get(&pid) {
                        for &(start, end) in &task.not_inherited {
                            drop_image_range(&mut missing, start, end);
                        }
                    }
                    self.adopt(pid, uffd, missing)?;
                }
                Event::Remap { from, to, len } => {
                    move_range(&mut self.tasks[i].missing, from, to, len);
                }
                Event::Remove { start, end } => {
                    // Zeros from now on: never copy the old pages there. Unregistered, the
                    // kernel zero-fills it; if that cannot be done, pf's faults do (the range
                    // is no longer missing).
                    let task = &mut self.tasks[i];
                    if let Some(uffd) = &task.uffd {
                        crate::uffd::unregister(uffd.as_fd(), start, end - start).map_err(
                            |source| Error::Sys {
                                op: "unregistering a removed range",
                                source,
                            },
                        )?;
                    }
                    drop_range(&mut task.missing, start, end);
                }
                Event::Unmap { start, end } => drop_range(&mut self.tasks[i].missing, start, end),
                Event::Unknown(kind) => {
                    return Err(self.failed(format!("an unknown userfaultfd event {kind:#x}")));
                }
            }
        }
    }

    /// Serve a fault of task `i` at page `addr`: its pages from the store, or zeros where the
    /// snapshot had none. A fault that must wait for an event goes back in the queue.
    fn fault(&mut self, i: usize, addr: u64) -> Result<()> {
        use crate::uffd::Filled;
        let Some(uffd) = self.tasks[i].uffd.as_ref() else {
            return Ok(());
        };
        match missing_at(&self.tasks[i].missing, addr) {
            Some((start, end, img)) => {
                self.step = FAULT_PAGES;
                if self.started.elapsed() < HOT_WINDOW {
                    self.memory.touched(self.tasks[i].pid, img + (addr - start));
                }
                let n = FAULT_PAGES.min((end - addr) / PAGE);
                match self.fill(i, addr, img + (addr - start), n)? {
                    Filled::Busy => self.faults.push_back((i, addr)),
                    Filled::NotTracked => {
                        // Gone from under the fault: let the faulting thread try again.
                        if let Some(uffd) = &self.tasks[i].uffd {
                            crate::uffd::wake(uffd.as_fd(), addr, PAGE);
                        }
                    }
                    _ => {}
                }
            }
            None => {
                match crate::uffd::zero(uffd.as_fd(), addr, PAGE).map_err(|source| Error::Sys {
                    op: "mapping a zero page",
                    source,
                })? {
                    Filled::Busy => {
                        // An event waits to be read first (the kernel holds every fill till then).
                        self.events(i)?;
                        self.faults.push_back((i, addr));
                    }
                    Filled::NotTracked => crate::uffd::wake(uffd.as_fd(), addr, PAGE),
                    Filled::Gone => self.tasks[i].gone(),
                    Filled::Bytes(_) | Filled::Exists => {}
                }
            }
        }
        Ok(())
    }

    /// Copy up to `n` pages into task `i` from `addr` on, which were at `img` in the images:
    /// read and checked first. What went in is no longer missing. A copy that would cross into
    /// an area the userfaultfd does not track (areas split and merge) is tried again shorter,
    /// down to one page; only a single page found untracked is dropped (`NotTracked`). `Busy`:
    /// nothing went in before an event was read (it has been now); try again.
    fn fill(&mut self, i: usize, addr: u64, img: u64, n: u64) -> Result<crate::uffd::Filled> {
        use crate::uffd::Filled;
        let pid = self.tasks[i].pid;
        let got = self.memory.read(pid, img, n, &mut self.buf)?;
        let mut pages = got;
        loop {
            let Some(uffd) = self.tasks[i].uffd.as_ref() else {
                return Ok(Filled::Gone);
            };
            let bytes = (pages * PAGE) as usize;
            let filled =
                crate::uffd::copy(uffd.as_fd(), addr, &self.buf[..bytes]).map_err(|source| {
                    Error::Sys {
                        op: "copying pages in (UFFDIO_COPY)",
                        source,
                    }
                })?;
            let task = &mut self.tasks[i];
            match filled {
                Filled::Bytes(b) => {
                    drop_range(&mut task.missing, addr, addr + b);
                    self.shared.served(b / PAGE);
                }
                Filled::NotTracked if pages > 1 => {
                    pages /= 2;
                    continue;
                }
                // There already, or not tracked (unmapped or unregistered meanwhile): nothing
                // to put there.
                Filled::Exists | Filled::NotTracked => {
                    drop_range(&mut task.missing, addr, addr + PAGE);
                }
                Filled::Gone => {
                    tracing::debug!(pid, "a lazily restored task is gone");
                    task.gone();
                }
                Filled::Busy => {
                    // An event is waiting to be read (a fork, a remap): the kernel holds every
                    // fill until it is.
                    self.events(i)?;
                }
            }
            return Ok(filled);
        }
    }

    /// Copy in the next missing run (up to [`BACKGROUND_PAGES`]) of the next task, taking
    /// turns with the background copying of every other tree this process serves.
    fn background(&mut self) -> Result<()> {
        let n = self.tasks.len();
        let Some(i) = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| !self.tasks[i].missing.is_empty())
        else {
            return Ok(());
        };
        self.next = i + 1;
        let restoring = self
            .memory
            .restoring
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        let turn = if restoring {
            None
        } else {
            BACKGROUND.try_lock().ok()
        };
        let Some(_turn) = turn else {
            // A restore from the same images is under way, or another tree's step: the next
            // poll waits a moment for events instead.
            self.held_back = true;
            return Ok(());
        };
        let Some((&start, &(end, img))) = self.tasks[i].missing.iter().next() else {
            return Ok(());
        };
        let pages = self.step.min((end - start) / PAGE);
        self.step = (self.step * 2).min(BACKGROUND_PAGES);
        self.fill(i, start, img, pages).map(|_| ())
    }

    /// Close every userfaultfd: ours, and the copies in the init's socket (received and
    /// closed here). The tree is complete or gone by now.
    fn release(&mut self) {
        self.tasks.clear();
        let _ = self.drain.set_nonblocking(true);
        while crate::streamer::recv_fd(&self.drain).is_ok() {}
    }
}

impl Serving {
    /// The snapshot being served.
    pub(crate) fn snapshot(&self) -> Digest256 {
        self.snapshot
    }

    /// The restore is done: this is how to kill the tree it made.
    pub(crate) fn set_killer(&self, killer: Killer) {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let failed = matches!(state.outcome, Some(LazyOutcome::Failed(_)));
        if failed {
            state.tree_gone = killer.kill();
        }
        state.killer = Some(killer);
        self.shared.changed.notify_all();
    }

    /// How serving ended, if it has.
    pub(crate) fn outcome(&self) -> Option<LazyOutcome> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .outcome
            .clone()
    }

    /// Pages served so far.
    pub(crate) fn pages_served(&self) -> u64 {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pages_served
    }

    /// The error that ended serving, taken (once).
    pub(crate) fn take_error(&self) -> Option<Error> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .error
            .take()
    }

    /// Wait until serving has ended (every page in, or failed), at most `timeout`.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Option<LazyOutcome> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = &state.outcome {
                return Some(outcome.clone());
            }
            state = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.shared
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// The restore failed: nothing to kill; end the daemon.
    pub(crate) fn abandon(self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.abandoned = true;
        // A failed restore leaves no tree: criu killed what it had made, and the namespace's
        // init, gone with it, took the rest.
        state.tree_gone = true;
        self.shared.changed.notify_all();
        drop(state);
        drop(self);
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            // Whatever the daemon does from here on is our doing (we kill it below).
            state.abandoned = true;
            if !matches!(state.outcome, Some(LazyOutcome::Complete)) {
                // Pages are owed: the tree must not outlive its server.
                if let Some(killer) = &state.killer {
                    state.tree_gone = killer.kill();
                }
                if state.outcome.is_none() {
                    state.outcome = Some(LazyOutcome::Failed(
                        "the handle of a lazily restored tree was dropped before every page was in"
                            .to_owned(),
                    ));
                }
            }
            self.shared.changed.notify_all();
        }
        // The daemon wakes and ends: it closes the tree's userfaultfds (the tree is gone, or
        // needs nothing more).
        drop(self.wake.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The error for a failed read of `file`'s pages from page `first`: a page that failed its
/// check is [`Error::CorruptPage`] (at `vaddr(page)`); anything else, such as a pack gone from
/// the store, is said as it is, not as a corrupt page.
fn read_error(
    snapshot: &pf_core::Digest256,
    file: &str,
    first: u64,
    source: PagesError,
    vaddr: impl Fn(u64) -> Option<u64>,
) -> Error {
    match source {
        PagesError::BadPage { page, .. } => Error::CorruptPage {
            snapshot: Some(*snapshot),
            file: file.to_owned(),
            page,
            vaddr: vaddr(page),
            source: Box::new(source),
        },
        source => Error::Pages {
            what: format!("reading page {first} of {file} of snapshot {snapshot} from the store"),
            source: Box::new(source),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANON: u32 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;

    /// Whether a gc could take `store`'s lock within `wait` (it is let go at once).
    fn gc_gets_the_lock(store: &Arc<dyn BlobStore>, wait: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Arc::clone(store);
        std::thread::spawn(move || {
            let lock = store.gc_lock();
            let _ = tx.send(lock.is_ok());
        });
        rx.recv_timeout(wait).unwrap_or(false)
    }

    #[test]
    fn a_serve_begun_while_gc_holds_the_lock_takes_its_share_once_gc_lets_go() {
        let store: Arc<dyn BlobStore> = Arc::new(pf_core::MemBlobStore::new());
        // No gc: the share is taken at once, and let go with the serve.
        let share = ServeShare::take(&store);
        assert!(!gc_gets_the_lock(&store, Duration::from_millis(200)));
        drop(share);
        assert!(gc_gets_the_lock(&store, Duration::from_secs(10)));
        // A gc holds the lock as the serve begins: the serve goes on, and takes its share
        // once that gc is over, so the next gc waits for it.
        let gc = store.gc_lock().expect("gc lock");
        let share = ServeShare::take(&store);
        drop(gc);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !gc_gets_the_lock(&store, Duration::from_millis(300)),
            "a later gc waits for the serve"
        );
        drop(share);
        assert!(gc_gets_the_lock(&store, Duration::from_secs(10)));
        // A serve over before the gc let go: the share its thread takes late is let go at once.
        let gc = store.gc_lock().expect("gc lock");
        drop(ServeShare::take(&store));
        drop(gc);
        std::thread::sleep(Duration::from_millis(100));
        assert!(gc_gets_the_lock(&store, Duration::from_secs(10)));
    }

    #[test]
    fn a_pack_gone_from_the_store_is_not_called_a_corrupt_page() {
        let snapshot = pf_core::Digest256::of(b"snapshot");
        let pack = pf_core::Digest256::of(b"pack");
        let bad = PagesError::BadPage {
            page: 7,
            source: pf_core::pack::PackError::Malformed {
                pack,
                reason: "test",
            },
        };
        let err = read_error(&snapshot, "pages-1.img", 5, bad, |p| Some(p * 4096));
        assert!(
            matches!(&err, Error::CorruptPage { page: 7, vaddr: Some(0x7000), snapshot: Some(s), .. } if *s == snapshot),
            "{err:?}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::StoreCorrupt);
        let gone = PagesError::Store {
            what: format!("reading pack {pack}"),
            source: pf_core::Error::NotFound { digest: pack },
        };
        let err = read_error(&snapshot, "pages-1.img", 5, gone, |_| None);
        assert_eq!(err.kind(), crate::ErrorKind::NotFound, "{err}");
        let text = anyhow_like(&err);
        assert!(!text.contains("corrupt"), "{text}");
        assert!(
            text.contains(&snapshot.to_string()) && text.contains("is not in the store"),
            "{text}"
        );
    }

    /// Pages stored in `store` as a pages file of `pages` distinct pages (page `i` starts with
    /// `i + 1`); the slots (in the file's one pack) of `forged` hold other bytes under the
    /// right digests. The file's bytes and its pages manifest.
    fn stored_pages(
        store: &Arc<dyn BlobStore>,
        pages: usize,
        forged: &[u32],
    ) -> (Vec<u8>, pf_core::Digest256) {
        use pf_core::pack::{Pack, PackBuilder};
        use pf_core::pages::{PageWriter, PagesManifest, load_manifest};
        let mut bytes = vec![0u8; pages * PAGE as usize];
        for (i, page) in bytes.chunks_exact_mut(PAGE as usize).enumerate() {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            page[3000] = i as u8;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pages-src.img");
        std::fs::write(&path, &bytes).expect("write");
        let mut writer = PageWriter::new(store.as_ref(), pf_core::page_index::PageIndex::none(), 2);
        let file = std::fs::File::open(&path).expect("open");
        let manifest = writer
            .write_file(&file, &path)
            .expect("store pages")
            .manifest;
        writer.commit().expect("commit");
        if forged.is_empty() {
            return (bytes, manifest);
        }
        let loaded = load_manifest(store.as_ref(), &manifest).expect("manifest");
        let digest = loaded.packs[0];
        let pack_bytes = store.get(&digest).expect("pack");
        let pack = Pack::parse(digest, &pack_bytes).expect("parse");
        let mut builder = PackBuilder::new(1);
        let mut page = [0u8; 4096];
        for (digest, slot) in pack.entries() {
            pack.read_page(slot, &digest, &mut page).expect("page");
            if forged.contains(&slot) {
                page[9] ^= 1;
            }
            builder.push(&page, digest);
        }
        let mut packs = loaded.packs.clone();
        packs[0] = store.put(&builder.finish().expect("pack")).expect("put");
        let bad = PagesManifest { packs, ..loaded };
        let bad = store
            .put(&serde_json::to_vec(&bad).expect("json"))
            .expect("put manifest");
        (bytes, bad)
    }

    fn task_of(store: &Arc<dyn BlobStore>, manifest: &pf_core::Digest256) -> TaskMemory {
        TaskMemory {
            file: "pages-1.img".to_owned(),
            pages: Arc::new(PagesReader::open_shared(Arc::clone(store), manifest).expect("open")),
            runs: Vec::new(),
            not_inherited: Vec::new(),
        }
    }

    /// Kept runs scattered over the file, one longer than a piece (256 pages): written in
    /// their order, on every core, byte for byte.
    #[test]
    fn kept_pages_are_written_in_order_whatever_thread_reads_them() {
        let store: Arc<dyn BlobStore> = Arc::new(pf_core::MemBlobStore::new());
        let (bytes, manifest) = stored_pages(&store, 1500, &[]);
        let task = task_of(&store, &manifest);
        let map = Pagemap {
            pages_id: 1,
            entries: vec![entry(0x10000, 1500, PE_PRESENT)],
        };
        let mut kept: Vec<(u64, u64)> = (0..40).map(|k| (k * 23 + 2, 1 + k % 4)).collect();
        kept.push((1000, 400));
        let snapshot = pf_core::Digest256::of(b"snapshot");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pages-1.img");
        write_kept(&snapshot, &task, &map, &kept, &path).expect("write kept pages");
        let want: Vec<u8> = kept
            .iter()
            .flat_map(|&(first, n)| {
                bytes[(first * PAGE) as usize..((first + n) * PAGE) as usize].to_vec()
            })
            .collect();
        let got = std::fs::read(&path).expect("read");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the kept pages differ from the file's");
    }

    /// Two bad pages among the kept ones: the write fails, and the error names the first in
    /// the file's order, with its address (a thread that meets a later one first does not
    /// win).
    #[test]
    fn the_first_bad_kept_page_is_the_error() {
        let store: Arc<dyn BlobStore> = Arc::new(pf_core::MemBlobStore::new());
        // A first freeze packs pages in file order: slot i holds page i.
        let (_, manifest) = stored_pages(&store, 1500, &[900, 1400]);
        let task = task_of(&store, &manifest);
        let map = Pagemap {
            pages_id: 1,
            entries: vec![entry(0x10000, 1500, PE_PRESENT)],
        };
        let kept: Vec<(u64, u64)> = (0..30).map(|k| (k * 50, 2)).collect();
        let snapshot = pf_core::Digest256::of(b"snapshot");
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let err = write_kept(&snapshot, &task, &map, &kept, &dir.path().join("p.img"))
                .expect_err("bad pages");
            assert!(
                matches!(&err, Error::CorruptPage { page: 900, vaddr: Some(v), .. } if *v == 0x10000 + 900 * PAGE),
                "{err:?}"
            );
        }
    }

    /// `err` and its sources, one after the other.
    fn anyhow_like(err: &Error) -> String {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    fn vma(start: u64, end: u64, flags: u32) -> Vma {
        Vma {
            start,
            end,
            flags,
            status: 1,
            madv: 0,
            prot: 3,
            shmid: 0,
        }
    }

    fn entry(vaddr: u64, nr_pages: u64, flags: u32) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            nr_pages,
            flags,
        }
    }

    #[test]
    fn runs_split_at_area_edges_and_keep_their_page_numbers() {
        let file = libc::MAP_PRIVATE as u32;
        let vmas = [
            vma(0x10000, 0x13000, file),
            vma(0x13000, 0x20000, ANON),
            vma(0x30000, 0x31000, ANON),
        ];
        let map = Pagemap {
            pages_id: 1,
            entries: vec![
                // 2 file pages then 3 anonymous ones, one run in CRIU's pagemap.
                entry(0x11000, 5, PE_PRESENT | PE_LAZY),
                entry(0x30000, 1, PE_PRESENT | PE_LAZY),
            ],
        };
        let (new, runs, kept) = split(&map, &vmas, &[]);
        assert_eq!(
            new.entries,
            vec![
                entry(0x11000, 2, PE_PRESENT),
                entry(0x13000, 3, PE_LAZY),
                entry(0x30000, 1, PE_LAZY),
            ]
        );
        assert_eq!(
            runs,
            vec![
                Run {
                    vaddr: 0x13000,
                    pages: 3,
                    first: 2
                },
                Run {
                    vaddr: 0x30000,
                    pages: 1,
                    first: 5
                },
            ]
        );
        assert_eq!(kept, vec![(0, 2)]);
        assert_eq!(new.pages_id, 1);
    }

    #[test]
    fn hot_pages_are_cut_out_of_the_lazy_runs() {
        let vmas = [vma(0x10000, 0x20000, ANON)];
        let map = Pagemap {
            pages_id: 1,
            entries: vec![entry(0x10000, 8, PE_PRESENT | PE_LAZY)],
        };
        // Pages 0, 3 and 4 were touched first by an earlier thaw; 99 is not in this file.
        let (new, runs, kept) = split(&map, &vmas, &[0, 3, 4, 99]);
        // Pages CRIU did not mark lazy (the one under a stack pointer) stay in the file.
        let unmarked = Pagemap {
            pages_id: 1,
            entries: vec![entry(0x10000, 8, PE_PRESENT)],
        };
        let (all_kept, no_runs, _) = split(&unmarked, &vmas, &[]);
        assert_eq!(all_kept.entries, vec![entry(0x10000, 8, PE_PRESENT)]);
        assert!(no_runs.is_empty());
        assert_eq!(
            new.entries,
            vec![
                entry(0x10000, 1, PE_PRESENT),
                entry(0x11000, 2, PE_LAZY),
                entry(0x13000, 2, PE_PRESENT),
                entry(0x15000, 3, PE_LAZY),
            ]
        );
        assert_eq!(kept, vec![(0, 1), (3, 2)]);
        assert_eq!(
            runs,
            vec![
                Run {
                    vaddr: 0x11000,
                    pages: 2,
                    first: 1
                },
                Run {
                    vaddr: 0x15000,
                    pages: 3,
                    first: 5
                },
            ]
        );
    }

    #[test]
    fn pages_outside_any_area_stay_in_the_file() {
        let map = Pagemap {
            pages_id: 2,
            entries: vec![
                entry(0x1000, 2, PE_PRESENT | PE_LAZY),
                entry(0x9000, 1, PE_PRESENT | PE_LAZY),
            ],
        };
        let (new, runs, kept) = split(&map, &[vma(0x9000, 0xa000, ANON)], &[]);
        assert_eq!(
            new.entries,
            vec![entry(0x1000, 2, PE_PRESENT), entry(0x9000, 1, PE_LAZY)]
        );
        assert_eq!(runs.len(), 1);
        assert_eq!(kept, vec![(0, 2)]);
    }

    #[test]
    fn a_task_finds_the_run_of_an_address() {
        let runs = [
            Run {
                vaddr: 0x10000,
                pages: 4,
                first: 0,
            },
            Run {
                vaddr: 0x20000,
                pages: 1,
                first: 4,
            },
        ];
        let find = |vaddr| find_run(&runs, vaddr).map(|(run, off)| (run.first, off));
        assert_eq!(find(0x10000), Some((0, 0)));
        assert_eq!(find(0x13000), Some((0, 3)));
        assert_eq!(find(0x14000), None, "past the run");
        assert_eq!(find(0x20000), Some((4, 0)));
        assert_eq!(find(0x0f000), None, "before every run");
        assert_eq!(find(0x10001), None, "not page aligned");
    }

    /// Item: the daemon's record of missing pages follows what the tree does: a removed or
    /// unmapped range is never filled (it reads as zeros, or is gone), a moved range keeps
    /// where its pages were in the images, and a fault finds its run.
    #[test]
    fn missing_runs_follow_removes_unmaps_and_moves() {
        const P: u64 = PAGE;
        let mut m: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        m.insert(0x10 * P, (0x20 * P, 0x10 * P));
        m.insert(0x30 * P, (0x38 * P, 0x30 * P));
        // A hole punched in the middle of the first run, and one across the gap.
        drop_range(&mut m, 0x14 * P, 0x16 * P);
        drop_range(&mut m, 0x1f * P, 0x31 * P);
        let runs: Vec<_> = m.iter().map(|(s, (e, i))| (s / P, e / P, i / P)).collect();
        assert_eq!(
            runs,
            [(0x10, 0x14, 0x10), (0x16, 0x1f, 0x16), (0x31, 0x38, 0x31)]
        );
        // Move part of a run elsewhere (mremap): its image addresses come along.
        move_range(&mut m, 0x18 * P, 0x100 * P, 4 * P);
        let runs: Vec<_> = m.iter().map(|(s, (e, i))| (s / P, e / P, i / P)).collect();
        assert_eq!(
            runs,
            [
                (0x10, 0x14, 0x10),
                (0x16, 0x18, 0x16),
                (0x1c, 0x1f, 0x1c),
                (0x31, 0x38, 0x31),
                (0x100, 0x104, 0x18),
            ]
        );
        assert_eq!(
            missing_at(&m, 0x102 * P),
            Some((0x100 * P, 0x104 * P, 0x18 * P))
        );
        assert_eq!(missing_at(&m, 0x18 * P), None);
        assert_eq!(missing_at(&m, 0x14 * P), None);
        assert_eq!(
            missing_at(&m, 0x37 * P),
            Some((0x31 * P, 0x38 * P, 0x31 * P))
        );
        // A move onto pages that were missing replaces them.
        move_range(&mut m, 0x100 * P, 0x10 * P, 2 * P);
        let runs: Vec<_> = m.iter().map(|(s, (e, i))| (s / P, e / P, i / P)).collect();
        assert_eq!(runs[0], (0x10, 0x12, 0x18));
        assert_eq!(runs[1], (0x12, 0x14, 0x12));
        assert_eq!(*runs.last().expect("run"), (0x102, 0x104, 0x1a));
    }

    #[test]
    fn task_pagemaps_are_told_from_shared_memorys() {
        assert_eq!(task_pagemap("pagemap-42.img"), Some(42));
        assert_eq!(task_pagemap("pagemap-shmem-7.img"), None);
        assert_eq!(task_pagemap("pagemap-.img"), None);
        assert_eq!(task_pagemap("pages-1.img"), None);
    }
}
