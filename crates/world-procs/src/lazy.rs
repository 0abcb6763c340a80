//! Lazy restore: a tree restored without its private anonymous memory, whose pages are served
//! from the store on demand, each checked against its digest before CRIU hands it to the kernel.
//!
//! The pieces, for one restore:
//!
//! ```text
//!  criu restore --lazy-pages ──uffd per task──▶ criu lazy-pages ◀──page-server protocol──▶ pf
//!  (the tree runs at once;                      (fills faults with      (socketpair,        (PagesReader:
//!   a touched page faults)                       UFFDIO_COPY, then       --ps-socket)        frame decoded,
//!                                                 the rest in the                            page hashed)
//!                                                 background)
//! ```
//!
//! - **Images.** [`extract`] unpacks the small image files, then rewrites every task's
//!   `pagemap-<pid>.img`: runs of pages inside areas CRIU can fill through userfaultfd
//!   ([`Vma::can_be_lazy`]) become `PE_LAZY` (not in the pages file), the rest stay `PE_PRESENT`
//!   and only those pages are written to `pages-<N>.img` (checked, as in an eager restore). Pages
//!   files no task pagemap names (shared memory) are rebuilt whole.
//! - **Serving.** pf is the page server CRIU's lazy-pages daemon talks to (CRIU's
//!   `criu/page-xfer.c`): a 32-byte `page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64
//!   dst_id}` per request (`dst_id` is the task's pid in the images, `cmd` `PS_IOV_GET`); the
//!   answer is the same header with `PS_IOV_ADD_F | PE_PRESENT << 16` and the pages' bytes;
//!   `PS_IOV_FORCE_CLOSE` ends the session with an `i32` status. The daemon gets its end of a
//!   socketpair (`--ps-socket`), so no port is open to anyone else.
//! - **Never wrong memory, never a hang.** A lazily restored task that touches a missing page
//!   waits in the kernel until the daemon copies it in; if the daemon's userfaultfd closed
//!   first, the kernel would hand it zeros. So the tree always dies before the daemon lets go:
//!   - a page that fails its hash is not sent: the tree is killed, and gone, before the session
//!     closes;
//!   - the daemon ends the session the same way whether it is done or gave up, so pf checks
//!     it holds no userfaultfd any more before it takes the end as "every page is in";
//!   - the daemon exiting early, or hanging up, kills the tree;
//!   - dropping the [`Serving`] handle while pages are owed kills the tree before the daemon;
//!   - if pf itself dies (even SIGKILL), the restore's namespace init, which holds a copy of
//!     pf's end of the socket, sees pf's lifeline close, kills everything in the namespace and
//!     reaps it before it exits and lets go of the socket: only then does the daemon see the
//!     page server gone.
//!
//!   Only restores into a new pid namespace can be lazy (that init is what makes this hold).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pf_core::pages::{PagesError, PagesReader};
use pf_core::{BlobStore, Digest256};

use crate::error::{Error, Result};
use crate::images::{PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, Vma};
use crate::wire::{CriuProcs, PagesImage};

const PAGE: u64 = 4096;
/// `PS_IOV_ADD_F`, `PS_IOV_GET`, `PS_IOV_CLOSE`, `PS_IOV_FORCE_CLOSE` (criu/page-xfer.c).
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// The low 16 bits of `cmd` are the command, the high ones its flags.
const PS_CMD_BITS: u32 = 16;
const PS_CMD_MASK: u32 = (1 << PS_CMD_BITS) - 1;
/// `sizeof(struct page_server_iov)` on 64-bit Linux: u32, 4 bytes of padding, 3 × u64.
const IOV_LEN: usize = 32;
/// The daemon asks for at most 4 MiB at a time (`MAX_XFER_LEN`); a larger request gets 4 MiB
/// (a short answer, which CRIU accepts).
const MAX_REQUEST_PAGES: u64 = 1024;
/// Pages read per thread when a request is large.
const SPLIT_PAGES: u64 = 64;
/// Held while a background (more than one page) request is read and checked.
static BACKGROUND: Mutex<()> = Mutex::new(());
/// How long a daemon may take to say it is listening.
const DAEMON_READY: Duration = Duration::from_secs(30);
/// How long a server that must kill the tree waits for the restore to say what the tree is.
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
    tasks: HashMap<u64, TaskMemory>,
    lazy_pages: u64,
    /// Where the hint of the pages thaws touch first is kept (None: the store keeps none).
    hot_path: Option<std::path::PathBuf>,
    /// Pages loaded eagerly because the hint named them.
    hot_pages: u64,
    /// Pages faulted in within [`HOT_WINDOW`] of a thaw, by pages file, not yet saved.
    touched: Mutex<HashMap<String, std::collections::BTreeSet<u64>>>,
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
            reason: format!("criu asked for pages of pid {pid}, which has no lazy memory"),
        })?;
        let (run, off) = find_run(&task.runs, vaddr).ok_or_else(|| Error::LazyFailed {
            snapshot: self.snapshot,
            reason: format!(
                "criu asked for pid {pid}'s page at {vaddr:#x}, which is not lazy memory"
            ),
        })?;
        let n = want.min(run.pages - off).min(MAX_REQUEST_PAGES);
        let first = run.first + off;
        out.resize((n * PAGE) as usize, 0);
        let read = |first: u64, buf: &mut [u8]| {
            task.pages.read(first, buf).map_err(|source| {
                let page = match &source {
                    PagesError::BadPage { page, .. } => *page,
                    _ => first,
                };
                Error::CorruptPage {
                    snapshot: Some(self.snapshot),
                    file: task.file.clone(),
                    page,
                    vaddr: Some(run.vaddr + (page - run.first) * PAGE),
                    source: Box::new(source),
                }
            })
        };
        if n <= SPLIT_PAGES {
            read(first, out)?;
        } else {
            let chunk = (SPLIT_PAGES * PAGE) as usize;
            std::thread::scope(|scope| {
                let jobs: Vec<_> = out
                    .chunks_mut(chunk)
                    .enumerate()
                    .map(|(i, buf)| {
                        let at = first + i as u64 * SPLIT_PAGES;
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
        let task = TaskMemory {
            file: file.clone(),
            pages: Arc::new(reader),
            runs,
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
        tasks,
        lazy_pages,
        hot_path,
        hot_pages,
        touched: Mutex::new(HashMap::new()),
    })
}

/// Write the pages that stay in the pages file (`kept` ranges of the old file, in order) to a
/// new `path`, each checked.
fn write_kept(
    snapshot: &Digest256,
    task: &TaskMemory,
    map: &Pagemap,
    kept: &[(u64, u64)],
    path: &Path,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut out = std::fs::File::options()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    let mut buf = Vec::new();
    for &(first, count) in kept {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(256);
            buf.resize((n * PAGE) as usize, 0);
            task.pages.read(first + done, &mut buf).map_err(|source| {
                let page = match &source {
                    PagesError::BadPage { page, .. } => *page,
                    _ => first + done,
                };
                Error::CorruptPage {
                    snapshot: Some(*snapshot),
                    file: task.file.clone(),
                    page,
                    vaddr: map.address_of(page),
                    source: Box::new(source),
                }
            })?;
            out.write_all(&buf)
                .map_err(|e| Error::io("write", path, e))?;
            done += n;
        }
    }
    Ok(())
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
    /// the namespace has.
    fn kill(&self) {
        match self {
            Killer::Init(pidfd) => {
                let _ = pf_os::fd::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                if !wait_readable(pidfd, KILL_WAIT) {
                    tracing::warn!(
                        "a killed lazily restored tree did not end within {KILL_WAIT:?}"
                    );
                }
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
        tracing::warn!(error = %error, "lazy restore failed; killing the restored tree");
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
            killer.kill();
        }
        self.changed.notify_all();
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

    fn served(&self, pages: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pages_served += pages;
    }
}

/// The serving side of one lazy restore: pf's page server and CRIU's lazy-pages daemon. Held
/// by the restored tree's handle.
#[derive(Debug)]
pub(crate) struct Serving {
    snapshot: Digest256,
    /// The images the daemon reads stay until it is gone.
    _images: Arc<crate::restore::ImagesDir>,
    shared: Arc<Shared>,
    daemon: OwnedFd,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A daemon started and its page server running; `work_dir` is where the restore must run
/// (`--work-dir`: the daemon listens on `lazy-pages.socket` there).
pub(crate) struct Started {
    pub(crate) serving: Serving,
    pub(crate) work_dir: std::path::PathBuf,
    /// A copy of pf's end of the page-server socket, for the namespace init to hold
    /// (`InitPlan::hold`).
    pub(crate) hold: OwnedFd,
}

/// Start CRIU's lazy-pages daemon on `images_dir` and pf's page server for `memory`.
pub(crate) fn start(
    criu: &crate::criu::Criu,
    images_dir: &Path,
    memory: Arc<LazyMemory>,
    images: Arc<crate::restore::ImagesDir>,
) -> Result<Started> {
    let sys = |op| move |source| Error::Sys { op, source };
    let (ours, theirs) = UnixStream::pair().map_err(sys("creating the page server's socket"))?;
    let hold: OwnedFd = ours
        .try_clone()
        .map_err(sys("duplicating the page server's socket"))?
        .into();
    let (mut ready_r, ready_w) =
        std::io::pipe().map_err(sys("creating the lazy-pages daemon's status pipe"))?;
    let ready_w: OwnedFd = ready_w.into();
    let theirs: OwnedFd = theirs.into();
    let mut args = Vec::new();
    crate::runner::push_opt(&mut args, "--images-dir", images_dir);
    args.push("--page-server".into());
    crate::runner::push_opt(&mut args, "--ps-socket", theirs.as_raw_fd().to_string());
    crate::runner::push_opt(&mut args, "--status-fd", ready_w.as_raw_fd().to_string());
    let keep = [theirs.as_raw_fd(), ready_w.as_raw_fd()];
    let inv = crate::runner::Invocation::new(criu, "lazy-pages", args, &keep, DAEMON_READY)?;
    let daemon = inv.spawn_background()?;
    drop((theirs, ready_w));
    let work_dir = daemon.work_dir().to_owned();
    let daemon_pid = daemon.pid();
    let daemon_pidfd = daemon.pidfd().map_err(sys("duplicating a pidfd"))?;
    // The daemon writes one byte when it listens, or exits.
    let ready = wait_readable(&ready_r, DAEMON_READY) && {
        let mut byte = [0u8; 1];
        matches!(ready_r.read(&mut byte), Ok(1))
    };
    if !ready {
        let _ = pf_os::fd::pidfd_send_signal(daemon_pidfd.as_fd(), libc::SIGKILL);
        return Err(match daemon.wait(|| false) {
            Err(e) => e,
            Ok(_) => Error::LazyFailed {
                snapshot: memory.snapshot,
                reason: "criu lazy-pages exited before it was ready".to_owned(),
            },
        });
    }
    tracing::debug!("criu lazy-pages is listening");
    let shared = Arc::new(Shared::default());
    let snapshot = memory.snapshot;
    let server = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pf-page-server".into())
            .spawn(move || {
                let mut sock = ours;
                let result = serve(&mut sock, &memory, &shared, daemon_pid);
                if let Err(e) = result {
                    // The tree dies (and is gone) before the daemon hears from us again: a task
                    // waiting for a page must never get the kernel's zeros instead.
                    shared.fail(e);
                }
                drop(sock);
                memory.save_hot();
            })
            .map_err(sys("starting the page server thread"))?
    };
    let watcher = {
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pf-lazy-daemon".into())
            .spawn(move || {
                // Killed by us (the handle was dropped, or serving failed first): not news.
                let ours = || {
                    theirs
                        .state
                        .lock()
                        .map(|s| s.abandoned || matches!(s.outcome, Some(LazyOutcome::Failed(_))))
                        .unwrap_or(true)
                };
                let result = daemon.wait(ours);
                let done = matches!(
                    theirs.state.lock().map(|s| s.outcome.clone()),
                    Ok(Some(LazyOutcome::Complete) | Some(LazyOutcome::Failed(_)))
                );
                match result {
                    Ok(_) if done => {}
                    Ok(_) => theirs.fail(Error::LazyFailed {
                        snapshot,
                        reason: "criu lazy-pages exited before every page was in".to_owned(),
                    }),
                    Err(e) => theirs.fail(e),
                }
            })
            .map_err(|source| {
                // No Serving will end the server thread's wait for a killer: say nobody will.
                let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                state.abandoned = true;
                shared.changed.notify_all();
                Error::Sys {
                    op: "starting the lazy-pages watcher thread",
                    source,
                }
            })?
    };
    Ok(Started {
        serving: Serving {
            snapshot,
            _images: images,
            shared,
            daemon: daemon_pidfd,
            threads: vec![server, watcher],
        },
        work_dir,
        hold,
    })
}

/// Whether `fd` becomes readable (or hits end of file) within `timeout`.
fn wait_readable(fd: &impl std::os::fd::AsFd, timeout: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
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

/// Answer the daemon's requests until it closes the session.
fn serve(sock: &mut UnixStream, memory: &LazyMemory, shared: &Shared, daemon: i32) -> Result<()> {
    let started = std::time::Instant::now();
    let io = |what: &'static str| move |source| Error::Sys { op: what, source };
    let mut buf = Vec::with_capacity((MAX_REQUEST_PAGES * PAGE) as usize);
    loop {
        let mut iov = [0u8; IOV_LEN];
        match read_full(sock, &mut iov) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::LazyFailed {
                    snapshot: memory.snapshot,
                    reason: "criu lazy-pages hung up before every page was in".to_owned(),
                });
            }
            Err(e) => return Err(io("reading a request from criu lazy-pages")(e)),
        }
        let word = |i: usize| u64::from_le_bytes(iov[i..i + 8].try_into().unwrap_or([0; 8]));
        let cmd = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let (nr_pages, vaddr, dst_id) = (word(8), word(16), word(24));
        match cmd & PS_CMD_MASK {
            PS_IOV_GET => {
                tracing::trace!(pid = dst_id, vaddr, nr_pages, "page request");
                // A fault (one page) is served at once; background transfers (more pages) take
                // turns across every tree this process serves, so that N clones filling in
                // their memory leave a core for restores and for the faults of the others.
                if nr_pages == 1 && started.elapsed() < HOT_WINDOW {
                    memory.touched(dst_id, vaddr);
                }
                let n = if nr_pages > 1 {
                    // Answers go back in request order, so a fault queued behind this request
                    // waits for it: while another tree's background request is being read, this
                    // one gets a single page (CRIU asks again for the rest).
                    match BACKGROUND.try_lock() {
                        Ok(_turn) => memory.read(dst_id, vaddr, nr_pages, &mut buf)?,
                        Err(_) => memory.read(dst_id, vaddr, 1, &mut buf)?,
                    }
                } else {
                    memory.read(dst_id, vaddr, nr_pages, &mut buf)?
                };
                let mut head = [0u8; IOV_LEN];
                head[0..4]
                    .copy_from_slice(&(PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS)).to_le_bytes());
                head[8..16].copy_from_slice(&n.to_le_bytes());
                head[16..24].copy_from_slice(&vaddr.to_le_bytes());
                head[24..32].copy_from_slice(&dst_id.to_le_bytes());
                sock.write_all(&head)
                    .and_then(|()| sock.write_all(&buf[..(n * PAGE) as usize]))
                    .map_err(io("sending pages to criu lazy-pages"))?;
                shared.served(n);
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                // CRIU ends the session the same way when it gives up: then it still holds the
                // userfaultfd of a task that has not got all its pages (it closes each one as
                // that task's pages are all in, or the task has exited).
                if let Some(open) = open_userfaultfds(daemon) {
                    return Err(Error::LazyFailed {
                        snapshot: memory.snapshot,
                        reason: format!(
                            "criu lazy-pages gave up with {open} task(s) still waiting for pages \
                             (its log says why)"
                        ),
                    });
                }
                shared.complete();
                sock.write_all(&0i32.to_le_bytes())
                    .map_err(io("ending the page server session"))?;
                return Ok(());
            }
            other => {
                return Err(Error::LazyFailed {
                    snapshot: memory.snapshot,
                    reason: format!(
                        "criu lazy-pages sent an unknown page server command {other:#x}"
                    ),
                });
            }
        }
    }
}

/// How many userfaultfds process `pid` holds, when it holds any (`None`: none, or it is gone);
/// a process whose descriptors cannot be read counts as holding one (pf cannot tell).
fn open_userfaultfds(pid: i32) -> Option<usize> {
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(fds) => fds,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(_) => return Some(1),
    };
    let n = fds
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
        })
        .count();
    (n > 0).then_some(n)
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
            killer.kill();
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
                    killer.kill();
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
        let _ = pf_os::fd::pidfd_send_signal(self.daemon.as_fd(), libc::SIGKILL);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANON: u32 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32;

    fn vma(start: u64, end: u64, flags: u32) -> Vma {
        Vma {
            start,
            end,
            flags,
            status: 1,
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

    #[test]
    fn task_pagemaps_are_told_from_shared_memorys() {
        assert_eq!(task_pagemap("pagemap-42.img"), Some(42));
        assert_eq!(task_pagemap("pagemap-shmem-7.img"), None);
        assert_eq!(task_pagemap("pagemap-.img"), None);
        assert_eq!(task_pagemap("pages-1.img"), None);
    }
}
