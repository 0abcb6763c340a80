//! `procs.criu.v2`: memory stored page by page.
//!
//! After `criu dump` has written its images, every `pages-<N>.img` is stored with
//! [`pf_core::pages::PageWriter`]: each distinct non-zero 4 KiB page once per store, in packs,
//! deduplicated against the store's page index (so a re-freeze stores about its changed pages),
//! hashed and compressed on every core. The pages files are then removed from the scratch
//! directory and the rest (core, mm, pagemap, fds …, a few KiB to a few MiB) goes into the same
//! deterministic tar as v1 (`criu_dump`). The packs, page lists and manifests are written
//! unsynced into one batch of the store and made durable and visible together (one sync round)
//! before [`store_images`] returns, so before the procs blob that lists the pages files with
//! their manifests (`memory`) names them.
//!
//! Restore extracts the tar, then rebuilds each pages file from its packs frame by frame
//! ([`pf_core::pages::PagesReader::write_to`], on every core), checking every page against its
//! digest before it is written: a bad page is [`Error::CorruptPage`] naming the file, the page
//! and its address (from the pagemap), and criu never runs. A restore done once streams the
//! pages files into `criu restore --stream` instead ([`extract_for_stream`], `streamer.rs`),
//! with the same checks before CRIU reads a page.
//!
//! Which format `capture` writes is chosen by `$PF_SNAPSHOT_FORMAT` (`v2`, the default, or
//! `v1`, the whole-archive format of earlier pf versions); restore reads both.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use pf_core::pack::PAGE_SIZE;
use pf_core::pages::{PageWriter, PagesError, PagesReader, load_manifest, read_pages};
use pf_core::{BlobStore, Digest256};

use crate::error::{Error, Result};
use crate::images::Pagemap;
use crate::wire::{CriuProcs, PagesImage};

/// The environment variable that picks the format `capture` writes.
pub const FORMAT_ENV: &str = "PF_SNAPSHOT_FORMAT";

/// The snapshot formats `capture` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `procs.criu.v1`: the images directory as one tar.
    V1,
    /// `procs.criu.v2`: pages files page by page, the rest as a tar.
    V2,
}

/// The format `$PF_SNAPSHOT_FORMAT` asks for (v2 when unset or empty).
pub(crate) fn format_from_env() -> Result<Format> {
    parse_format(std::env::var_os(FORMAT_ENV).as_deref())
}

fn parse_format(value: Option<&std::ffi::OsStr>) -> Result<Format> {
    match value.map(|v| v.to_string_lossy()) {
        None => Ok(Format::V2),
        Some(v) if v.is_empty() || v == "v2" => Ok(Format::V2),
        Some(v) if v == "v1" => Ok(Format::V1),
        Some(v) => Err(Error::BadSnapshotFormat {
            value: v.into_owned(),
        }),
    }
}

pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Whether `name` is a CRIU pages file (`pages-<digits>.img`).
pub(crate) fn is_pages_file(name: &str) -> bool {
    name.strip_prefix("pages-")
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Every pagemap in `dir`, by the `N` of the `pages-N.img` it describes.
pub(crate) fn pagemaps(dir: &Path) -> Result<HashMap<String, Pagemap>> {
    let mut out = HashMap::new();
    let read = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in read {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("pagemap-") && name.ends_with(".img") {
            let map = crate::images::pagemap(&entry.path()).map_err(|source| Error::Image {
                what: "the memory map (pagemap-*.img)",
                source,
            })?;
            out.insert(format!("pages-{}.img", map.pages_id), map);
        }
    }
    Ok(out)
}

/// Hashes the pages files `criu dump` writes into an images directory while it writes them, on
/// one thread at the lowest priority (CRIU's dump takes about one core and the goblin is frozen
/// meanwhile: the thread gets only what CRIU leaves idle), so that after the dump only the pages
/// not reached yet are hashed, on every core. [`finish`](Self::finish) takes what was hashed
/// once the thread is out of the step it is in, if any (at most 4 MiB of pages: it reads them
/// through mappings, and the files' pages are freed behind the packer once the dump is over);
/// it never starts another, and ends when it next looks.
pub(crate) struct Prehash {
    shared: std::sync::Arc<Following>,
}

/// [`Shared`] and the signal that a step of the thread ended.
#[derive(Default)]
struct Following {
    shared: std::sync::Mutex<Shared>,
    step_done: std::sync::Condvar,
}

impl Following {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stop the thread, and wait until it is out of the step it is in (if any): it reads the
    /// files through mappings, and once the dump is over their pages are freed behind the
    /// packer. The caller is then idle, so a step at nice 19 gets a core to end on.
    fn stop(&self) -> std::sync::MutexGuard<'_, Shared> {
        let mut shared = self.lock();
        shared.stopped = true;
        while shared.stepping {
            shared = self
                .step_done
                .wait(shared)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        shared
    }
}

/// What [`Prehash`] hashed, by pages file name.
pub(crate) type Prehashed = HashMap<String, PrehashedFile>;

/// What was learnt of the pages files while CRIU dumped them.
pub(crate) enum Early<'s> {
    /// Dumped into the directory, followed by [`Prehash`]: the digests of their first pages,
    /// and the list of the base one of them most likely descends from ([`early_base`]).
    Followed(Prehashed, Option<Box<EarlyBase<'s>>>),
    /// Streamed through pf (`capture_stream`): every page's digest, the pages the store lacks
    /// packed during the dump or written into their files.
    Streamed(crate::capture_stream::Captured<'s>),
}

/// The digests of the first pages of one pages file, and which file it was (device and inode),
/// so they are used only for that very file.
#[derive(Debug, Default)]
pub(crate) struct PrehashedFile {
    id: (u64, u64),
    digests: Vec<Option<Digest256>>,
    /// Of `digests`, those of non-zero pages.
    nonzero: usize,
}

/// A file's (device, inode).
fn file_id(file: &File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// The digests of `early` if they are of `file` (the same file, at least as long, its last
/// hashed page and one in the middle hashing the same now), else none: pages are then hashed
/// after the dump. CRIU only appends to a pages file; this checks that it still holds.
fn prehash_for(file: &File, path: &Path, early: PrehashedFile) -> Vec<Option<Digest256>> {
    let n = early.digests.len();
    if n == 0 {
        return Vec::new();
    }
    let same = file_id(file).is_ok_and(|id| id == early.id)
        && file
            .metadata()
            .is_ok_and(|m| m.len() >= n as u64 * PAGE_SIZE as u64);
    let unchanged = same
        && [n / 2, n - 1].iter().all(|&i| {
            let mut page = vec![0u8; PAGE_SIZE];
            use std::os::unix::fs::FileExt as _;
            file.read_exact_at(&mut page, i as u64 * PAGE_SIZE as u64)
                .is_ok()
                && early.digests[i]
                    == (!pf_core::pack::is_zero_page(&page))
                        .then(|| pf_core::pack::page_digest(&page))
        });
    if !unchanged {
        tracing::warn!(
            file = %path.display(),
            "a pages file changed after criu wrote it: hashing all of it again"
        );
        return Vec::new();
    }
    early.digests
}

/// Between [`Prehash`] and its thread: once `stopped`, the thread adds nothing more.
#[derive(Default)]
struct Shared {
    stopped: bool,
    /// The thread is hashing (its files mapped); it never starts a step once stopped.
    stepping: bool,
    hashed: Prehashed,
}

impl Prehash {
    /// Start following the pages files that appear in `dir`.
    pub(crate) fn start(dir: &Path) -> Self {
        let shared = std::sync::Arc::new(Following::default());
        let theirs = std::sync::Arc::clone(&shared);
        let dir = dir.to_owned();
        if let Err(e) = std::thread::Builder::new()
            .name("pf-prehash".to_owned())
            .spawn(move || follow(&dir, &theirs))
        {
            tracing::debug!(error = %e, "no thread to hash pages during the dump");
        }
        Self { shared }
    }

    /// A sample of `n` digests spread over the non-zero pages hashed so far of the first pages
    /// file with at least `min` of them, and its name; None while there is none.
    fn sample(&self, min: usize, n: usize) -> Option<(String, Vec<Digest256>)> {
        let shared = self.shared.lock();
        let mut names: Vec<&String> = shared.hashed.keys().collect();
        names.sort();
        names.into_iter().find_map(|name| {
            let file = &shared.hashed[name];
            (file.nonzero >= min.max(1)).then(|| {
                let step = file.nonzero.div_ceil(n.max(1));
                let sample = file
                    .digests
                    .iter()
                    .flatten()
                    .step_by(step)
                    .copied()
                    .collect();
                (name.clone(), sample)
            })
        })
    }

    /// Stop (the dump has ended) and return what was hashed.
    pub(crate) fn finish(self) -> Prehashed {
        std::mem::take(&mut self.shared.stop().hashed)
    }
}

impl Drop for Prehash {
    fn drop(&mut self) {
        drop(self.shared.stop());
    }
}

/// [`Prehash`]'s thread: until stopped, open every pages file that appears in `dir` and hash
/// what has been written of it, handing each slice of digests over as it is done. Anything that
/// goes wrong only means more is hashed after the dump.
fn follow(dir: &Path, following: &Following) {
    use pf_core::pages::PageFollower;
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(error = %e, "cannot lower this thread's priority; hashing pages after the dump");
        return;
    }
    let mut followers: Vec<(String, PageFollower)> = Vec::new();
    let mut run = || -> std::result::Result<(), String> {
        while !following.lock().stopped {
            for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
                let name = entry.map_err(|e| e.to_string())?.file_name();
                let name = name.to_string_lossy();
                if is_pages_file(&name) && !followers.iter().any(|(n, _)| *n == name) {
                    let path = dir.join(&*name);
                    let file = File::open(&path).map_err(|e| e.to_string())?;
                    let id = file_id(&file).map_err(|e| e.to_string())?;
                    following.lock().hashed.insert(
                        name.to_string(),
                        PrehashedFile {
                            id,
                            digests: Vec::new(),
                            nonzero: 0,
                        },
                    );
                    followers.push((name.into_owned(), PageFollower::new(file, path)));
                }
            }
            let mut hashed = 0;
            for (name, follower) in &mut followers {
                // Never a step once stopped; `Prehash::finish` waits for the one under way.
                let Some(_stepping) = Stepping::start(following) else {
                    return Ok(());
                };
                let step = follower.step().map_err(|e| e.to_string())?;
                if step.is_empty() {
                    continue;
                }
                hashed += step.len();
                let mut shared = following.lock();
                if shared.stopped {
                    return Ok(());
                }
                if let Some(file) = shared.hashed.get_mut(name.as_str()) {
                    file.digests.extend_from_slice(step);
                    file.nonzero += step.iter().flatten().count();
                }
            }
            if hashed == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        Ok(())
    };
    if let Err(why) = run()
        && !following.lock().stopped
    {
        tracing::debug!(%why, "hashing pages during the dump stopped; hashing the rest after it");
    }
}

/// The page list of the base a pages file most likely descends from, read while CRIU still
/// dumps ([`early_base`]).
pub(crate) struct EarlyBase<'s> {
    file: String,
    list: PagesReader<'s>,
}

/// Pages of a file hashed before its base is guessed from them: 16 MiB.
const EARLY_BASE_MIN_PAGES: usize = 4096;
/// Pages sampled to guess it, as after the dump.
const EARLY_BASE_SAMPLE: usize = 64;

/// While CRIU dumps into the directory `prehash` follows, until `over`: once the first pages
/// file has [`EARLY_BASE_MIN_PAGES`] pages hashed, guess the snapshot it most likely descends
/// from from a sample of them and read that snapshot's page list, at the lowest priority. The
/// list (a 1 GiB goblin's: 10 MiB, 40-odd ms to read and check) was read after the dump, before
/// any page could be packed; it is used only if the guess made from the whole file after the
/// dump names the same snapshot (the first pages alone may be shared with other programs'
/// snapshots). Only ever a guess: None when there is none, or the dump ended first.
pub(crate) fn early_base<'s>(
    store: &'s dyn BlobStore,
    prehash: &Prehash,
    over: &std::sync::atomic::AtomicBool,
) -> Option<EarlyBase<'s>> {
    if rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19).is_err() {
        return None;
    }
    let started = std::time::Instant::now();
    let (file, sample) = loop {
        if over.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        if let Some(found) = prehash.sample(EARLY_BASE_MIN_PAGES, EARLY_BASE_SAMPLE) {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let manifest = pf_core::pages::guess_base_of(store, &store.page_index(), sample)?;
    // The dump over meanwhile: the writer reads it beside hashing the rest, not the dump's
    // caller waiting for this thread.
    if over.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let list = PagesReader::open(store, &manifest)
        .inspect_err(|e| tracing::debug!(base = %manifest, error = %e, "no early base list"))
        .ok()?;
    tracing::debug!(%file, base = %manifest, elapsed = ?started.elapsed(), "base list read during the dump");
    Some(EarlyBase { file, list })
}

/// Sets its flag when dropped (a panic too): how [`early_base`] learns the dump is over.
pub(crate) struct SetOnDrop<'a>(pub(crate) &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A step of [`follow`] under way: marked in [`Shared::stepping`] from [`start`](Self::start)
/// until dropped (also on an error or a panic), when whoever waits for it is woken.
struct Stepping<'a>(&'a Following);

impl<'a> Stepping<'a> {
    /// None once stopped.
    fn start(following: &'a Following) -> Option<Self> {
        let mut shared = following.lock();
        if shared.stopped {
            return None;
        }
        shared.stepping = true;
        Some(Self(following))
    }
}

impl Drop for Stepping<'_> {
    fn drop(&mut self) {
        self.0.lock().stepping = false;
        self.0.step_done.notify_all();
    }
}

/// CRIU's images but the pages up to this size are stored in the pages' batch ([`store_images`]).
const BESIDE_PAGES_MAX: u64 = 16 << 20;

/// Store the pages files of the images in `dir` page by page, remove them from `dir`, and store
/// the rest as a tar. Returns the tar's digest and the pages files' manifests, all durable and
/// visible by then. `prehashed` holds the digests of pages [`Prehash`] hashed during the dump.
pub(crate) fn store_images<'s>(
    store: &'s dyn BlobStore,
    dir: &Path,
    pid: i32,
    mut early: Early<'s>,
) -> Result<(Digest256, Vec<PagesImage>)> {
    tracing::debug!("storing the images");
    let maps = pagemaps(dir)?;
    tracing::debug!(files = maps.len(), "pagemaps read");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("list", dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_pages_file(n))
        .collect();
    names.sort();
    let prepacked = match &mut early {
        Early::Streamed(captured) => captured.prepacked.take(),
        Early::Followed(..) => None,
    };
    if let Some(p) = &prepacked {
        tracing::debug!(
            pages = p.pages(),
            pack_bytes = p.pack_bytes(),
            "pages packed during the dump"
        );
    }
    let mut writer = match prepacked {
        Some(p) => PageWriter::with_prepacked(store, store.page_index(), threads(), p),
        None => PageWriter::new(store, store.page_index(), threads()),
    };
    let mut memory = Vec::with_capacity(names.len());
    let mut freeing = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
        let (digests, kept, base) = match &mut early {
            Early::Followed(prehashed, base) => (
                prehashed
                    .remove(&name)
                    .map(|early| prehash_for(&file, &path, early))
                    .unwrap_or_default(),
                None,
                // Used if the writer's own guess names it too.
                (None, base.take_if(|b| b.file == name).map(|b| b.list)),
            ),
            Early::Streamed(captured) => {
                let pages = captured.pages.remove(&name).ok_or_else(|| {
                    Error::io(
                        "store",
                        &path,
                        std::io::Error::other("criu's dump did not stream this pages file"),
                    )
                })?;
                let (base, list) = pages.base.unzip();
                (pages.digests, Some(pages.kept), (base, list))
            }
        };
        // As the packer leaves the file behind, its memory (tmpfs: 90 ms a GiB) is freed by a
        // thread, beside the packing, the page list, the tar and the commit; the file leaves
        // the images dir (it must not go into the tar) the first time. The name goes first:
        // removing it waits for the inode's lock, which freeing holds.
        let mut removed = None;
        let mut freer: Option<std::sync::mpsc::Sender<u64>> = None;
        let mut started = false;
        let mut free = |end: u64| {
            if !started {
                started = true;
                // Opened for writing: freeing a range of a file is a write.
                let writable = File::options().write(true).open(&path);
                removed = Some(std::fs::remove_file(&path));
                let (ends, read) = std::sync::mpsc::channel::<u64>();
                if let Ok(writable) = writable
                    && let Ok(handle) = std::thread::Builder::new()
                        .name("pf-free-pages".to_owned())
                        .spawn(move || free_pages(&writable, &read))
                {
                    freeing.push(handle);
                    freer = Some(ends);
                }
            }
            if let Some(ends) = &freer {
                let _ = ends.send(end);
            }
        };
        let stored = writer
            .write_file_kept(
                &file,
                &path,
                digests,
                (base.0.as_ref(), base.1),
                kept.as_deref(),
                &mut free,
            )
            .map_err(|source| Error::Pages {
                what: format!("storing the memory of pid {pid} ({name})"),
                source: Box::new(source),
            });
        // Its freeing thread ends once it freed the last end it was sent.
        drop(freer);
        let stored = stored?;
        if let Some(map) = maps.get(&name)
            && map.present_pages() != stored.pages
        {
            return Err(Error::Image {
                what: "the memory (pages-*.img)",
                source: crate::images::ImageError::Malformed {
                    path,
                    offset: 0,
                    reason: "the pages file does not hold the pages its pagemap says are present",
                },
            });
        }
        tracing::debug!(
            file = %name,
            pages = stored.pages,
            zero = stored.zero_pages,
            new = stored.new_pages,
            pack_bytes = stored.pack_bytes,
            "memory stored"
        );
        drop(file);
        // Removed above; if the callback did not come, here (it must not go into the tar).
        removed
            .unwrap_or_else(|| std::fs::remove_file(&path))
            .map_err(|e| Error::io("remove", &path, e))?;
        memory.push(PagesImage {
            file: name,
            manifest: stored.manifest,
            pages: stored.pages,
        });
    }
    let mut tar = crate::tarball::ImagesTar::new(dir)?;
    let len = tar.len();
    // Small (CRIU's images but the pages: ~40 KB for a goblin), it goes into the pages' batch
    // and is synced with them, not in a sync round of its own (1–6 ms here).
    let images = if len <= BESIDE_PAGES_MAX {
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        std::io::Read::read_to_end(&mut tar, &mut bytes)
            .map_err(|e| Error::io("read the images in", dir, e))?;
        writer.put_beside(&bytes).map_err(|source| Error::Pages {
            what: format!("storing the images of pid {pid}"),
            source: Box::new(source),
        })?
    } else {
        store
            .put_reader_with_len(&mut tar, len)
            .map_err(|e| Error::store(format!("storing the images of pid {pid}"), e))?
            .digest
    };
    writer.commit().map_err(|source| Error::Pages {
        what: format!("recording the pages of pid {pid} in the store's page index"),
        source: Box::new(source),
    })?;
    tracing::debug!("committed; waiting for the pages files' memory to be freed");
    for handle in freeing {
        if handle.join().is_err() {
            tracing::debug!("the thread freeing a pages file panicked");
        }
    }
    tracing::debug!("pages files freed");
    Ok((images, memory))
}

/// Give back the memory of a pages file up to each end it is sent (its bytes before it were
/// read for the last time), whoever else still holds it open (the thread that hashed it during
/// the dump may), until the sender is gone. Best effort: what is not freed here is freed when
/// the file is closed and removed.
fn free_pages(file: &File, ends: &std::sync::mpsc::Receiver<u64>) {
    use rustix::fs::FallocateFlags;
    let mut freed = 0;
    for end in ends {
        if end <= freed {
            continue;
        }
        if let Err(e) = rustix::fs::fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            freed,
            end - freed,
        ) {
            tracing::debug!(error = %e, "cannot free a pages file early");
            return;
        }
        freed = end;
    }
}

/// Extract a v2 snapshot's images into `dest`: the tar, then every pages file rebuilt from its
/// packs, each page checked before it is written.
pub(crate) fn extract_into(
    store: &dyn BlobStore,
    procs: &CriuProcs,
    memory: &[PagesImage],
    dest: &Path,
) -> Result<()> {
    let source = store
        .open(&procs.criu_dump)
        .map_err(|e| Error::store(format!("opening the images {}", procs.criu_dump), e))?;
    crate::tarball::extract(source, &procs.criu_dump, dest)?;
    rebuild_pages_files(store, procs, memory, dest)
}

/// Extract a v2 snapshot's images into `dest` but its pages files, which a streamed restore
/// rebuilds from their packs while CRIU reads them (`streamer.rs`); returns the pagemaps, by
/// pages file, to place a bad page.
pub(crate) fn extract_for_stream(
    store: &dyn BlobStore,
    procs: &CriuProcs,
    memory: &[PagesImage],
    dest: &Path,
) -> Result<HashMap<String, Pagemap>> {
    check_pages_names(procs, memory)?;
    let source = store
        .open(&procs.criu_dump)
        .map_err(|e| Error::store(format!("opening the images {}", procs.criu_dump), e))?;
    crate::tarball::extract(source, &procs.criu_dump, dest)?;
    pagemaps(dest)
}

/// Refuse a snapshot whose memory names anything but a pages file.
fn check_pages_names(procs: &CriuProcs, memory: &[PagesImage]) -> Result<()> {
    for image in memory {
        if !is_pages_file(&image.file) {
            return Err(Error::UnsafeTar {
                digest: procs.criu_dump,
                entry: image.file.clone(),
                reason: "is not a pages file name (pages-<N>.img)",
            });
        }
    }
    Ok(())
}

/// Rebuild the pages files `memory` of the images extracted into `dest` from their packs,
/// each page checked before it is written.
pub(crate) fn rebuild_pages_files(
    store: &dyn BlobStore,
    procs: &CriuProcs,
    memory: &[PagesImage],
    dest: &Path,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let maps = pagemaps(dest)?;
    check_pages_names(procs, memory)?;
    check_room(store, memory, dest)?;
    for image in memory {
        let path = dest.join(&image.file);
        let out = File::options()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        let map = maps.get(&image.file);
        read_pages(store, &image.manifest, &out, &path, threads()).map_err(
            |source| match source {
                PagesError::BadPage { page, .. } => Error::CorruptPage {
                    snapshot: None,
                    file: image.file.clone(),
                    page,
                    vaddr: map.and_then(|m| m.address_of(page)),
                    source: Box::new(source),
                },
                source => Error::Pages {
                    what: format!(
                        "rebuilding {} of the images {}",
                        image.file, procs.criu_dump
                    ),
                    source: Box::new(source),
                },
            },
        )?;
    }
    Ok(())
}

/// Refuse to rebuild the pages files into `dest` when their non-zero pages (zero pages stay
/// holes) need more room than is free there: [`Error::NoRoom`] says how much is needed and free,
/// before anything is written.
fn check_room(store: &dyn BlobStore, memory: &[PagesImage], dest: &Path) -> Result<()> {
    let mut needed = 0u64;
    for image in memory {
        let m = load_manifest(store, &image.manifest).map_err(|source| Error::Pages {
            what: format!("reading the pages manifest of {}", image.file),
            source: Box::new(source),
        })?;
        let stored = m.pages.saturating_sub(m.zero_pages);
        needed = needed.saturating_add(stored.saturating_mul(PAGE_SIZE as u64));
    }
    let available = crate::tarball::room_in(dest)?;
    if needed > available {
        return Err(Error::NoRoom {
            dir: dest.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item: digests hashed during the dump are used only for the very file they were hashed
    /// from, unchanged: another file of the same name, or one whose pages changed since, gets
    /// hashed again.
    #[test]
    fn pages_hashed_early_are_used_only_for_the_same_unchanged_file() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pages-1.img");
        let pages: Vec<u8> = (0..8u8)
            .flat_map(|i| std::iter::repeat_n(i + 1, PAGE_SIZE))
            .collect();
        std::fs::write(&path, &pages).expect("write");
        let early = |file: &File| {
            let mut f =
                pf_core::pages::PageFollower::new(file.try_clone().expect("dup"), path.clone());
            let digests = f.step().expect("step").to_vec();
            PrehashedFile {
                id: file_id(file).expect("id"),
                nonzero: digests.iter().flatten().count(),
                digests,
            }
        };
        let file = File::open(&path).expect("open");
        let got = prehash_for(&file, &path, early(&file));
        assert_eq!(got.len(), 8, "the same file: used");
        // The same name, another file.
        let hashed = early(&file);
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, &pages).expect("write again");
        let other = File::open(&path).expect("open");
        assert!(
            prehash_for(&other, &path, hashed).is_empty(),
            "another file"
        );
        // The same file, its last hashed page rewritten.
        let hashed = early(&other);
        let mut w = File::options().write(true).open(&path).expect("open rw");
        use std::os::unix::fs::FileExt as _;
        w.write_all_at(&[0xAA; 16], 7 * PAGE_SIZE as u64)
            .expect("rewrite");
        w.flush().expect("flush");
        assert!(
            prehash_for(&other, &path, hashed).is_empty(),
            "a page changed"
        );
    }

    #[test]
    fn format_comes_from_the_environment_value() {
        use std::ffi::OsStr;
        assert_eq!(parse_format(None).expect("unset"), Format::V2);
        assert_eq!(
            parse_format(Some(OsStr::new(""))).expect("empty"),
            Format::V2
        );
        assert_eq!(
            parse_format(Some(OsStr::new("v1"))).expect("v1"),
            Format::V1
        );
        assert_eq!(
            parse_format(Some(OsStr::new("v2"))).expect("v2"),
            Format::V2
        );
        let err = parse_format(Some(OsStr::new("V2"))).expect_err("bad");
        assert!(err.to_string().contains("set it to v2 or v1"), "{err}");
    }

    /// Item: a v2 thaw into a file system too small for its memory fails before rebuilding
    /// anything, saying how much it needs and how much is free. Needs root (it mounts a small
    /// tmpfs), so it runs with the live tests.
    #[test]
    fn live_v2_extract_refuses_pages_that_do_not_fit() {
        if !crate::test_support::live("live_v2_extract_refuses_pages_that_do_not_fit") {
            return;
        }
        let store = pf_core::MemBlobStore::new();
        let work = tempfile::tempdir().expect("tempdir");
        // A pages file of 512 distinct pages (2 MiB) and one of zeros (no room needed).
        let src = work.path().join("src");
        std::fs::create_dir(&src).expect("mkdir");
        let mut bytes = vec![0u8; 512 * PAGE_SIZE];
        for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
        std::fs::write(src.join("pages-1.img"), &bytes).expect("write");
        std::fs::write(src.join("pages-2.img"), vec![0u8; 256 * PAGE_SIZE]).expect("write");
        let mut writer = PageWriter::new(&store, pf_core::page_index::PageIndex::none(), 2);
        let mut memory = Vec::new();
        for name in ["pages-1.img", "pages-2.img"] {
            let path = src.join(name);
            let file = File::open(&path).expect("open");
            let stored = writer.write_file(&file, &path).expect("store pages");
            memory.push(PagesImage {
                file: name.to_owned(),
                manifest: stored.manifest,
                pages: stored.pages,
            });
            std::fs::remove_file(&path).expect("rm");
        }
        writer.commit().expect("commit");
        std::fs::write(src.join("core-1.img"), b"core").expect("write");
        let mut tar = crate::tarball::ImagesTar::new(&src).expect("tar");
        let len = tar.len();
        let criu_dump = store
            .put_reader_with_len(&mut tar, len)
            .expect("put tar")
            .digest;
        let procs = CriuProcs {
            criu_dump,
            pids: vec![1],
            root_pid: None,
            criu_version: None,
            kernel: None,
            arch: None,
            captured_at: None,
            options: None,
            stdio: Vec::new(),
            labels: std::collections::BTreeMap::new(),
            dump_stats: None,
            memory: Some(memory.clone()),
        };
        // 1 MiB of tmpfs: the tar fits, the 2 MiB of pages do not.
        let small = work.path().join("small");
        std::fs::create_dir(&small).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &small,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m,mode=0700"),
        )
        .expect("mount a small tmpfs");
        struct Unmount<'p>(&'p Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(&small);
        let dest = small.join("images");
        std::fs::create_dir(&dest).expect("mkdir");
        let err = extract_into(&store, &procs, &memory, &dest).expect_err("too small");
        match &err {
            Error::NoRoom {
                dir,
                needed,
                available,
            } => {
                assert_eq!(dir, &dest);
                assert_eq!(*needed, 512 * PAGE_SIZE as u64, "zero pages need no room");
                assert!(*available < 1 << 20, "{available}");
            }
            other => panic!("expected NoRoom, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("{}", 512 * PAGE_SIZE)) && text.contains("are free in"),
            "{text}"
        );
        assert!(!dest.join("pages-1.img").exists(), "nothing rebuilt");
        // With room, the same snapshot extracts page for page.
        let roomy = work.path().join("roomy");
        std::fs::create_dir(&roomy).expect("mkdir");
        extract_into(&store, &procs, &memory, &roomy).expect("extract");
        assert_eq!(
            std::fs::read(roomy.join("pages-1.img")).expect("read"),
            bytes
        );
        assert_eq!(
            std::fs::read(roomy.join("pages-2.img")).expect("read"),
            vec![0u8; 256 * PAGE_SIZE]
        );
    }

    #[test]
    fn a_base_list_is_read_during_the_dump_once_enough_pages_are_hashed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = pf_core::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let path = tmp.path().join("pages-1.img");
        let n = 2 * EARLY_BASE_MIN_PAGES;
        // Distinct non-zero pages, and a zero page every tenth (not counted, not sampled).
        let pages: Vec<u8> = (0..n as u32)
            .flat_map(|i| {
                let fill = if i % 10 == 0 { 0 } else { i };
                std::iter::repeat_n(fill.to_le_bytes(), PAGE_SIZE / 4).flatten()
            })
            .collect();
        std::fs::write(&path, &pages).expect("write");
        let mut writer = PageWriter::new(&store, store.page_index(), 2);
        let stored = writer
            .write_file(&File::open(&path).expect("open"), &path)
            .expect("stored");
        writer.commit().expect("commit");
        let digests: Vec<Option<Digest256>> = pages
            .chunks(PAGE_SIZE)
            .map(|p| (!pf_core::pack::is_zero_page(p)).then(|| pf_core::pack::page_digest(p)))
            .collect();
        let prehash = Prehash {
            shared: std::sync::Arc::new(Following::default()),
        };
        let hashed = |k: usize| {
            let digests = digests[..k].to_vec();
            prehash.shared.lock().hashed.insert(
                "pages-1.img".to_owned(),
                PrehashedFile {
                    id: (0, 0),
                    nonzero: digests.iter().flatten().count(),
                    digests,
                },
            );
        };
        // Too few hashed when the dump ends: no guess.
        hashed(EARLY_BASE_MIN_PAGES);
        assert!(prehash.sample(EARLY_BASE_MIN_PAGES, 64).is_none());
        let over = AtomicBool::new(true);
        assert!(early_base(&store, &prehash, &over).is_none());
        // Enough: a sample of non-zero pages, and the list of the snapshot that holds them.
        hashed(n);
        let (file, sample) = prehash.sample(EARLY_BASE_MIN_PAGES, 64).expect("sample");
        assert_eq!(file, "pages-1.img");
        assert!((60..=64).contains(&sample.len()), "{}", sample.len());
        assert!(sample.iter().all(|d| digests.contains(&Some(*d))));
        over.store(false, Ordering::Relaxed);
        let base = early_base(&store, &prehash, &over).expect("a base");
        assert_eq!(base.file, "pages-1.img");
        assert_eq!(base.list.manifest(), &stored.manifest);
    }

    #[test]
    fn pages_files_are_recognised() {
        for ok in ["pages-1.img", "pages-123.img"] {
            assert!(is_pages_file(ok), "{ok}");
        }
        for bad in [
            "pages-.img",
            "pages-1.img.x",
            "pagemap-1.img",
            "pages-a.img",
            "../pages-1.img",
        ] {
            assert!(!is_pages_file(bad), "{bad}");
        }
    }
}
