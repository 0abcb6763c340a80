//! Restore: a procs blob → verified, safely extracted images → `criu restore` → a running tree
//! whose root (or whose namespace init) is our child.
//!
//! In the host pid namespace, `criu restore -d -S` makes the restored root a child of this
//! process, so [`Restored::wait`] gets its real exit status. The tree needs its original pids:
//! a process holding one that is exiting or a zombie is waited out (bounded), a live holder is
//! an error that suggests `new_pidns`, and a pid criu still finds taken is waited for and retried
//! once before the error names its holder. A root that ran and exited before criu was done is a
//! success: the caller collects its status with [`Restored::wait`]. With `new_pidns`, the tree is restored inside fresh PID + mount namespaces under a
//! small init of ours (see `nsinit.rs`), beside anything holding the same pids.

use std::ffi::OsString;
use std::io::Read as _;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use pf_core::{BlobStore, Digest256};
use pf_os::Exit;
use pf_os::proc::{PidState, pid_state};

use crate::error::{Error, Result};
use crate::nsinit;
use crate::runner::{Invocation, push_opt};
use crate::wire::{CriuProcs, ProcsBlob};

/// How long one `criu restore` may take before it is killed.
const RESTORE_DEADLINE: Duration = Duration::from_secs(300);
/// How long a process holding a pid we need may take to finish exiting and be reaped.
const ZOMBIE_WAIT: Duration = Duration::from_secs(10);

/// A descriptor for the restored tree to inherit: CRIU reconnects the tree's file that it
/// recorded as `key` (e.g. `pipe:[1234]`) to `fd` (`--inherit-fd fd[N]:key`).
#[derive(Debug)]
pub struct InheritFd {
    /// Our descriptor (closed in this process once the restore is done).
    pub fd: OwnedFd,
    /// CRIU's name for the file in the images, e.g. `pipe:[1234]`.
    pub key: String,
}

/// How to restore. There is no `Default`: say what you want.
#[derive(Debug)]
pub struct RestoreOptions {
    /// Restore inside fresh PID + mount namespaces (works while the original pids are taken).
    pub new_pidns: bool,
    /// The tree was dumped with `--shell-job` (`--shell-job` again).
    pub shell_job: bool,
    /// With `shell_job`, for a terminal shell (`pf shell thaw|beam`): a root that led a session
    /// of its own (a shell in a terminal window) joins the restorer's session instead
    /// ([`crate::images::join_restorers_session`]; an images dir given is rewritten in place),
    /// so that it can have the restorer's terminal, with job control and Ctrl-C. CRIU hands
    /// that terminal's foreground to the root's group. Not for a root that is pid 1 (a whole
    /// pid namespace, which must lead its session), nor for trees that are not terminal shells:
    /// a copy whose session leader is outside its pid namespace cannot be dumped again.
    pub join_session: bool,
    /// Descriptors to hand to the tree.
    pub inherit: Vec<InheritFd>,
    /// More arguments for `criu restore`.
    pub extra_args: Vec<String>,
}

/// A private directory of extracted images, removed on drop.
#[derive(Debug)]
pub struct ImagesDir {
    dir: pf_os::scratch::Scratch,
}

impl ImagesDir {
    /// Where the images are.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The procs blob `digest`, read (and verified) from `store`.
pub fn load_procs(store: &dyn BlobStore, digest: &Digest256) -> Result<ProcsBlob> {
    let bytes = store
        .get(digest)
        .map_err(|e| Error::store(format!("reading the procs blob {digest}"), e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::NotProcs {
        digest: *digest,
        source,
    })
}

/// The CRIU dump `digest` names ([`Error::Unsupported`] for a record of a process CRIU could
/// not dump).
fn load_criu_procs(store: &dyn BlobStore, digest: &Digest256) -> Result<CriuProcs> {
    match load_procs(store, digest)? {
        ProcsBlob::Criu(c) => Ok(c),
        ProcsBlob::Unsupported {
            unsupported_on,
            note,
        } => Err(Error::Unsupported {
            digest: *digest,
            unsupported_on,
            note,
        }),
    }
}

/// A restore's share of the store's lock ([`BlobStore::reader_lock`]), so that no gc removes
/// what it reads while it reads it. While a gc holds the lock, waits for it to end: the name
/// the caller resolved may be one that gc no longer found, and what gc removed is then not
/// read at all (the load says the blob is not in the store; a lazy restore checks its packs).
/// `None` where the lock cannot be taken at all (a store on a read-only filesystem).
pub(crate) fn reading_share(store: &dyn BlobStore) -> Option<pf_core::StoreLock> {
    if let Some(lock) = store.reader_lock() {
        return Some(lock);
    }
    // (Or the lock cannot be taken at all: then the wait below fails at once.)
    tracing::info!("a gc of the store may be under way: waiting for it to end before reading");
    // A second try, should a signal interrupt the wait (a handled one: pf's are blocked).
    (0..2).find_map(|_| store.reader_lock_wait().ok())
}

/// Extract `procs`'s images through the store's verifying reader into a fresh private
/// directory (regular files with plain names only; see `tarball::extract`).
pub fn extract_images(store: &dyn BlobStore, procs: &CriuProcs) -> Result<ImagesDir> {
    let _reading = reading_share(store);
    let digest = &procs.criu_dump;
    if let Some(memory) = &procs.memory {
        let dir = crate::capture::scratch_dir("pf-restore-")?;
        crate::v2::extract_into(store, procs, memory, dir.path())?;
        tracing::debug!(%digest, dir = %dir.path().display(), "v2 images rebuilt");
        return Ok(ImagesDir { dir });
    }
    let source = store
        .open(digest)
        .map_err(|e| Error::store(format!("opening the images {digest}"), e))?;
    let dir = crate::capture::scratch_dir("pf-restore-")?;
    crate::tarball::extract(source, digest, dir.path())?;
    tracing::debug!(%digest, dir = %dir.path().display(), "images extracted");
    Ok(ImagesDir { dir })
}

/// A snapshot's images extracted for a lazy restore: every image file, with the memory that
/// can be served on demand left out of the pages files, and what serves it (see `lazy.rs`).
/// Any number of lazy restores may run from one; they share its page cache. Removed on drop.
#[derive(Debug)]
pub struct LazyImages {
    dir: std::sync::Arc<ImagesDir>,
    memory: std::sync::Arc<crate::lazy::LazyMemory>,
}

impl LazyImages {
    /// Where the images are.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Pages served on demand to each restored copy.
    pub fn lazy_pages(&self) -> u64 {
        self.memory.lazy_pages()
    }
}

/// Snapshots whose memory is at least this large are thawed lazily unless the caller says
/// otherwise ([`lazy_suits`]).
pub const LAZY_MIN_BYTES: u64 = 32 << 20;

/// Whether a thaw of the procs blob `digest` should serve its memory on demand when the caller
/// has no preference: its memory is stored page by page (`procs.criu.v2`), it holds at least
/// [`LAZY_MIN_BYTES`], and this kernel has userfaultfd. Below that size an eager restore is as
/// fast (measured: a 24 MiB goblin answers as fast either way, a 64 MiB one twice as fast
/// lazily, a 10 MiB one faster eagerly).
pub fn lazy_suits(store: &dyn BlobStore, digest: &Digest256) -> Result<bool> {
    let ProcsBlob::Criu(procs) = load_procs(store, digest)? else {
        return Ok(false);
    };
    let Some(memory) = &procs.memory else {
        return Ok(false);
    };
    let bytes: u64 = memory.iter().map(|m| m.pages.saturating_mul(4096)).sum();
    Ok(bytes >= LAZY_MIN_BYTES && userfaultfd_available())
}

/// Whether a userfaultfd can be made here (probed once: the kernel has it, and no seccomp
/// filter forbids it).
fn userfaultfd_available() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(pf_os::fd::userfaultfd_usable)
}

/// Extract the procs blob `digest` for [`restore_lazy`]: the small image files, the pages that
/// cannot be served lazily (checked), and the map of the rest. Only `procs.criu.v2` snapshots
/// (memory stored page by page) can be restored lazily ([`Error::LazyNeedsV2`]).
pub fn extract_images_lazy(
    store: std::sync::Arc<dyn BlobStore>,
    digest: &Digest256,
) -> Result<LazyImages> {
    let _reading = reading_share(store.as_ref());
    let procs = load_criu_procs(store.as_ref(), digest)?;
    let Some(memory) = &procs.memory else {
        return Err(Error::LazyNeedsV2 { snapshot: *digest });
    };
    if !userfaultfd_available() {
        return Err(Error::NoUserfaultfd);
    }
    let dir = crate::capture::scratch_dir("pf-restore-")?;
    let lazy = crate::lazy::extract(&store, digest, &procs, memory, dir.path())
        .map_err(|e| e.in_snapshot(digest))?;
    tracing::debug!(
        %digest,
        dir = %dir.path().display(),
        lazy_pages = lazy.lazy_pages(),
        hot_pages = lazy.hot_pages(),
        "images extracted for a lazy restore"
    );
    Ok(LazyImages {
        dir: std::sync::Arc::new(ImagesDir { dir }),
        memory: std::sync::Arc::new(lazy),
    })
}

/// Restore the tree of `images` with its memory served on demand: it runs as soon as CRIU has
/// rebuilt it, each page it touches comes from the store (checked against its digest) when it
/// first touches it, and the rest follows in the background. The returned [`Restored`] holds
/// the serving side: [`Restored::wait_pages`] says when every page is in. If serving fails
/// (a corrupt page, the daemon gone), the tree is killed and [`Restored::lazy_error`] says why.
pub fn restore_lazy(images: &LazyImages, mut opts: RestoreOptions) -> Result<Restored> {
    if !opts.new_pidns {
        // Only a namespace init can take the whole tree down before its userfaultfds close.
        return Err(Error::LazyNeedsPidns);
    }
    let criu = crate::criu::for_restore()?;
    let images_dir =
        std::path::absolute(images.path()).map_err(|e| Error::io("resolve", images.path(), e))?;
    // Held until the daemon has its own share: no gc begins in between. One that ran since
    // the images were extracted may have removed packs (the snapshot's name was removed):
    // said now, before anything runs, not when the tree first touches a page of one.
    let _reading = reading_share(images.memory.store());
    if let Some(pack) = images.memory.missing_pack() {
        return Err(Error::Store {
            what: format!(
                "the pages of snapshot {} are no longer all in the store (a pack it needs is \
                 gone: removed by hand, or by a gc after the snapshot's name was removed since \
                 it was loaded here); nothing was restored: `pf store verify` names what is \
                 missing, and a snapshot kept named while it is thawed keeps its packs",
                images.memory.snapshot()
            ),
            source: pf_core::Error::NotFound { digest: pack },
        });
    }
    let started = crate::lazy::start(
        std::sync::Arc::clone(&images.memory),
        std::sync::Arc::clone(&images.dir),
    )?;
    opts.extra_args.push("--lazy-pages".into());
    opts.extra_args.push("--work-dir".into());
    opts.extra_args
        .push(started.work_dir.to_string_lossy().into_owned());
    let serving = started.serving;
    let hold = Some(started.hold.as_raw_fd());
    let restoring = images.memory.restoring();
    let restored = restore_prepared(criu, &images_dir, opts, false, hold);
    drop(restoring);
    drop(started.hold);
    match restored {
        Ok(mut restored) => {
            let init = restored.init.as_ref().map(|i| i.pid);
            let pidfd = init
                .ok_or(std::io::ErrorKind::NotFound.into())
                .and_then(pf_os::fd::pidfd_open);
            let killer = match pidfd {
                Ok(fd) => crate::lazy::Killer::Init(fd),
                Err(source) => {
                    // The tree first (killed and reaped), then its server.
                    drop(restored);
                    serving.abandon();
                    return Err(Error::Sys {
                        op: "opening a pidfd for the namespace init",
                        source,
                    });
                }
            };
            serving.set_killer(killer);
            tracing::info!(
                pid = restored.root,
                lazy_pages = images.lazy_pages(),
                "restored lazily: memory is served on demand"
            );
            restored.lazy = Some(serving);
            Ok(restored)
        }
        Err(e) => {
            serving.abandon();
            Err(e)
        }
    }
}

/// Restore the procs blob `procs` (a digest; resolve names with `BlobStore::resolve`).
pub fn restore(store: &dyn BlobStore, procs: &Digest256, opts: RestoreOptions) -> Result<Restored> {
    let _span = tracing::info_span!("restore", %procs).entered();
    let _reading = reading_share(store);
    match load_procs(store, procs)? {
        ProcsBlob::Criu(c) => {
            // Before extracting a GiB: is there a criu to hand it to?
            crate::criu::for_restore()?;
            if let Some(memory) = &c.memory {
                let dir = crate::capture::scratch_dir("pf-restore-")?;
                let maps = crate::v2::extract_for_stream(store, &c, memory, dir.path())
                    .map_err(|e| e.in_snapshot(procs))?;
                let images = crate::streamer::Images {
                    store,
                    dir: dir.path(),
                    pages: memory,
                    maps: &maps,
                };
                return restore_streaming(&images, opts).map_err(|e| e.in_snapshot(procs));
            }
            let images = extract_images(store, &c).map_err(|e| e.in_snapshot(procs))?;
            restore_dir(images.path(), opts)
        }
        ProcsBlob::Unsupported {
            unsupported_on,
            note,
        } => Err(Error::Unsupported {
            digest: *procs,
            unsupported_on,
            note,
        }),
    }
}

/// A `procs.criu.v2` snapshot's images extracted for streamed restores: every file but the
/// pages files, which each restore rebuilds from the store while CRIU reads them (`criu restore
/// --stream`), every page checked before CRIU gets it. No tmpfs copy of the memory is made, and
/// checking the pages overlaps the restore; but each restore reads and checks every page again,
/// so this suits a snapshot restored once ([`extract_images`] suits one restored many times).
/// Removed on drop.
#[derive(Debug)]
pub struct StreamedImages {
    dir: ImagesDir,
    store: std::sync::Arc<dyn BlobStore>,
    snapshot: Digest256,
    memory: Vec<crate::wire::PagesImage>,
    maps: std::collections::HashMap<String, crate::images::Pagemap>,
}

impl StreamedImages {
    /// Where the images (all but the pages files) are.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Extract the snapshot `digest` for streamed restores ([`StreamedImages`]); `None` when it is
/// not in the page-level format (`procs.criu.v2`), whose pages files can be streamed:
/// [`extract_images`] it instead.
pub fn extract_images_streamed(
    store: std::sync::Arc<dyn BlobStore>,
    digest: &Digest256,
) -> Result<Option<StreamedImages>> {
    let _reading = reading_share(store.as_ref());
    let procs = load_criu_procs(store.as_ref(), digest)?;
    let Some(memory) = procs.memory.clone() else {
        return Ok(None);
    };
    let dir = crate::capture::scratch_dir("pf-restore-")?;
    let maps = crate::v2::extract_for_stream(store.as_ref(), &procs, &memory, dir.path())
        .map_err(|e| e.in_snapshot(digest))?;
    tracing::debug!(%digest, dir = %dir.path().display(), "images extracted for a streamed restore");
    Ok(Some(StreamedImages {
        dir: ImagesDir { dir },
        store,
        snapshot: *digest,
        memory,
        maps,
    }))
}

/// Restore the tree of `images`, its pages files streamed from the store into `criu restore`
/// as it reads them. A page that fails its check fails the restore ([`Error::CorruptPage`],
/// naming the snapshot, the file, the page and its address) before the tree runs.
pub fn restore_streamed(images: &StreamedImages, opts: RestoreOptions) -> Result<Restored> {
    let _reading = reading_share(images.store.as_ref());
    let serve = crate::streamer::Images {
        store: images.store.as_ref(),
        dir: images.path(),
        pages: &images.memory,
        maps: &images.maps,
    };
    restore_streaming(&serve, opts).map_err(|e| e.in_snapshot(&images.snapshot))
}

/// `criu restore --stream` of `images`, served by pf's image streamer.
fn restore_streaming(
    images: &crate::streamer::Images<'_>,
    mut opts: RestoreOptions,
) -> Result<Restored> {
    let criu = crate::criu::for_restore()?;
    let dir = std::path::absolute(images.dir).map_err(|e| Error::io("resolve", images.dir, e))?;
    opts.extra_args.push("--stream".to_owned());
    crate::streamer::serve_while(images, || restore_prepared(criu, &dir, opts, true, None))
}

/// Restore the tree whose CRIU images are in `images_dir`.
pub fn restore_dir(images_dir: &Path, opts: RestoreOptions) -> Result<Restored> {
    let criu = crate::criu::for_restore()?;
    let images_dir =
        std::path::absolute(images_dir).map_err(|e| Error::io("resolve", images_dir, e))?;
    crate::images::check_pages_files(&images_dir).map_err(|source| Error::Image {
        what: "the memory (pagemap and pages files)",
        source,
    })?;
    restore_prepared(criu, &images_dir, opts, true, None)
}

/// [`restore_dir`] with criu found and the images dir absolute; `retry` allows a second
/// attempt when criu meets a taken pid (not for a lazy restore, whose daemon serves one).
fn restore_prepared(
    criu: &crate::criu::Criu,
    images_dir: &Path,
    mut opts: RestoreOptions,
    retry: bool,
    hold: Option<RawFd>,
) -> Result<Restored> {
    // Our own copies at numbers >= 3 (close-on-exec here; cleared for criu only).
    let inherit: Vec<(OwnedFd, String)> = opts
        .inherit
        .iter()
        .map(|i| {
            i.fd.try_clone()
                .map(|fd| (fd, i.key.clone()))
                .map_err(|source| Error::Sys {
                    op: "duplicating a descriptor to inherit",
                    source,
                })
        })
        .collect::<Result<_>>()?;
    drop(std::mem::take(&mut opts.inherit));
    if opts.shell_job && opts.join_session {
        // A shell that led its session joins ours, so that it can have this terminal (job
        // control, Ctrl-C); best effort: an images dir we may not write is restored as it is.
        match crate::images::join_restorers_session(images_dir) {
            Ok(true) => tracing::debug!("the shell job's session is the restorer's"),
            Ok(false) => {}
            Err(err) => tracing::warn!(
                error = %err,
                "the restored tree keeps a session of its own: it cannot take this terminal \
                 (no job control)"
            ),
        }
    }
    let keep: Vec<RawFd> = inherit.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
    let restored = if opts.new_pidns {
        run_restore(criu, images_dir, &opts, &inherit, &keep, hold)
    } else {
        let pids = crate::images::pstree_pids(images_dir).map_err(|source| Error::Image {
            what: "the process tree (pstree.img)",
            source,
        })?;
        if retry {
            retry_on_pid_clash(&pids, || {
                run_restore(criu, images_dir, &opts, &inherit, &keep, hold)
            })
        } else {
            wait_for_free_pids(&pids, Instant::now())?;
            run_restore(criu, images_dir, &opts, &inherit, &keep, hold)
        }
    };
    drop(inherit);
    let restored = restored?;
    tracing::info!(pid = restored.root, ns_pid = restored.ns_root, "restored");
    Ok(restored)
}

/// One `criu restore` of `images_dir`.
fn run_restore(
    criu: &crate::criu::Criu,
    images_dir: &Path,
    opts: &RestoreOptions,
    inherit: &[(OwnedFd, String)],
    keep: &[RawFd],
    hold: Option<RawFd>,
) -> Result<Restored> {
    let mut args: Vec<OsString> = Vec::new();
    push_opt(&mut args, "--images-dir", images_dir);
    args.push("--restore-detached".into());
    args.push("--restore-sibling".into());
    if opts.shell_job {
        args.push("--shell-job".into());
    }
    for (fd, key) in inherit {
        push_opt(
            &mut args,
            "--inherit-fd",
            format!("fd[{}]:{key}", fd.as_raw_fd()),
        );
    }
    args.extend(opts.extra_args.iter().map(OsString::from));
    // The pidfile goes into criu's work dir; its path is only known once the invocation exists,
    // so it is appended last.
    let mut inv = Invocation::new(criu, "restore", args, keep, RESTORE_DEADLINE)?;
    // A shell job takes the session of criu's terminal: criu must have it on stdin.
    inv.stdin_is_ours = opts.shell_job;
    inv.hold = hold;
    let pidfile = inv.work_dir().join("restore.pid");
    inv.args.push("--pidfile".into());
    inv.args.push(pidfile.clone().into());
    // Held until criu is done: from its creating the ghost files to its unlinking them.
    let _turn = crate::ghosts::lock_if_ghosts(images_dir)?;
    tracing::debug!(new_pidns = opts.new_pidns, "running criu restore");
    if opts.new_pidns {
        restore_in_new_pidns(inv, &pidfile)
    } else {
        restore_here(inv, &pidfile)
    }
}

/// Run `attempt` (a `criu restore` in our pid namespace of a tree with `pids`) once the pids are
/// free, waiting (bounded) for the processes holding them to exit and be reaped. When criu still
/// meets a taken pid (the kernel frees a pid a moment after /proc stops showing it, and an
/// exiting process can take a while), wait again within the same bound and try once more; a
/// second clash names the process holding the pid.
fn retry_on_pid_clash<T>(pids: &[i32], mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    wait_for_free_pids(pids, start)?;
    match attempt() {
        Err(e) if let Some(pid) = pid_clash(&e) => {
            tracing::info!(
                pid,
                "criu found a pid still taken; waiting for it and retrying"
            );
            std::thread::sleep(Duration::from_millis(100));
            wait_for_free_pids(pids, start)?;
            attempt().map_err(|e| match pid_clash(&e) {
                Some(pid) => Error::PidInUse {
                    pid,
                    holder: holder_of(pid),
                },
                None => e,
            })
        }
        other => other,
    }
}

/// The pid criu could not give back because it was taken, as its log said
/// (`Can't fork for PID: File exists`, classified by [`crate::criu_log`]).
fn pid_clash(err: &Error) -> Option<i32> {
    match err.criu_failure() {
        Some(crate::criu_log::CriuFailure::PidInUse { pid }) => Some(pid),
        _ => None,
    }
}

/// What holds `pid` right now, for an error message: `name (state S, parent P)`, or what the
/// kernel shows when no process is visible.
fn holder_of(pid: i32) -> String {
    match (pf_os::proc::comm(pid), pf_os::proc::stat(pid)) {
        (Some(comm), Some(stat)) => {
            format!("{comm}, state {}, parent {}", stat.state, stat.ppid)
        }
        _ => "no process visible in /proc: the kernel had not released the pid of an exited \
              process yet"
            .to_owned(),
    }
}

fn read_pidfile(path: &Path) -> Result<i32> {
    let text = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    match nsinit::parse_pid(&text) {
        0 => Err(Error::io(
            "parse",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a pid"),
        )),
        pid => Ok(pid),
    }
}

fn restore_here(inv: Invocation, pidfile: &Path) -> Result<Restored> {
    let finished = inv.run()?;
    let root = read_pidfile(pidfile)?;
    drop(finished);
    let mut restored = Restored {
        root,
        ns_root: root,
        init: None,
        exit: None,
        reaped_elsewhere: false,
        detached: false,
        lazy: None,
    };
    // A root that ran and exited already (its stdin at end of file, say) is a zombie child of
    // ours: a success, whose status the caller collects with `wait`. Only a root that is gone
    // without a status for us (criu ran through sudo) is an error.
    if pid_state(root) == PidState::Gone {
        restored.detached = true;
        return Err(Error::RestoredDied {
            pid: root,
            status: "gone, reaped by another process".to_owned(),
        });
    }
    Ok(restored)
}

fn restore_in_new_pidns(inv: Invocation, pidfile: &Path) -> Result<Restored> {
    let (work, init) = inv.run_in_new_pidns(pidfile)?;
    let init_pid = init.pid;
    let mut restored = Restored {
        root: init_pid,
        ns_root: 0,
        init: Some(init),
        exit: None,
        reaped_elsewhere: false,
        detached: false,
        lazy: None,
    };
    restored.ns_root = read_pidfile(pidfile)?;
    drop(work);
    // The root is the init's only child now (criu is reaped); find its host pid.
    let host = pf_os::proc::children(init_pid)
        .into_iter()
        .find(|&c| pf_os::proc::inner_pid(c) == Some(restored.ns_root));
    match host {
        Some(root) if pid_state(root) == PidState::Alive => restored.root = root,
        // It ran and exited already (its stdin at end of file, say): a success. The init has
        // its status and stays our unreaped child until `wait`, so the init's pid stands for
        // the tree and cannot be recycled meanwhile.
        _ => tracing::debug!(
            ns_pid = restored.ns_root,
            "the restored root has already exited"
        ),
    }
    Ok(restored)
}

/// Wait (bounded by [`ZOMBIE_WAIT`] from `start`) while processes holding our pids are exiting
/// or are zombies waiting to be reaped; fail on a live holder.
fn wait_for_free_pids(pids: &[i32], start: Instant) -> Result<()> {
    loop {
        let mut waiting = None;
        for &pid in pids {
            match pid_state(pid) {
                PidState::Gone => {}
                // Killed and still tearing itself down (a dump without --leave-running killed
                // it a moment ago): it is about to be a zombie.
                PidState::Alive if pf_os::proc::has_ended(pid) => {
                    let ppid = pf_os::proc::stat(pid).map_or(0, |s| s.ppid);
                    waiting = Some((pid, ppid));
                }
                PidState::Alive => {
                    return Err(Error::PidInUse {
                        pid,
                        holder: holder_of(pid),
                    });
                }
                PidState::Zombie { ppid } => waiting = Some((pid, ppid)),
            }
        }
        let Some((pid, ppid)) = waiting else {
            return Ok(());
        };
        if start.elapsed() >= ZOMBIE_WAIT {
            return Err(Error::PidZombie {
                pid,
                ppid,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A restored tree. Its root is our child (host namespace), or its namespace init is our child
/// and exits with the root's status (`new_pidns`).
///
/// When criu runs through `sudo -n` (not root), the root is sudo's child rather than ours and
/// gets reparented when sudo exits: [`Restored::wait`] then fails with ECHILD; kill and pids
/// still work.
///
/// Dropping it kills and reaps the tree unless [`Restored::detach`] was called.
#[derive(Debug)]
pub struct Restored {
    root: i32,
    ns_root: i32,
    init: Option<nsinit::Init>,
    exit: Option<Exit>,
    /// The init said the root ended as another process's child (`TAG_ROOT_GONE`): waits fail
    /// with [`Error::RootReapedElsewhere`].
    reaped_elsewhere: bool,
    detached: bool,
    /// The serving side of a lazy restore (dropped after the tree is killed).
    lazy: Option<crate::lazy::Serving>,
}

impl Restored {
    /// The root's pid as seen from this process's namespace. With `new_pidns`, when the root
    /// had already exited by the time criu was done, the namespace init's pid: the init holds
    /// the root's status and stays unreaped (so its pid stays ours) until [`Restored::wait`].
    pub fn pid(&self) -> i32 {
        self.root
    }

    /// The root's pid inside its namespace: the original pid.
    pub fn ns_pid(&self) -> i32 {
        self.ns_root
    }

    /// The namespace init's pid (`new_pidns` only).
    pub fn init_pid(&self) -> Option<i32> {
        self.init.as_ref().map(|i| i.pid)
    }

    /// The tree's pids right now (host view), root first.
    pub fn pids(&self) -> Vec<i32> {
        if self.exit.is_some() {
            return Vec::new();
        }
        pf_os::proc::tree(self.root)
    }

    /// Wait for the root to exit; its real exit status.
    pub fn wait(&mut self) -> Result<Exit> {
        self.wait_inner(None)?.ok_or(Error::Sys {
            op: "waiting for the restored root",
            source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
        })
    }

    /// How the tree ended, once a wait saw it end (the init's status when the root's own is
    /// unknown: [`Error::RootReapedElsewhere`]).
    pub fn ended(&self) -> Option<Exit> {
        self.exit
    }

    /// The root's exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<Exit>> {
        self.wait_inner(Some(WaitPidFlag::WNOHANG))
    }

    fn wait_inner(&mut self, flags: Option<WaitPidFlag>) -> Result<Option<Exit>> {
        if let Some(exit) = self.exit {
            if self.reaped_elsewhere {
                return Err(Error::RootReapedElsewhere {
                    ns_pid: self.ns_root,
                });
            }
            return Ok(Some(exit));
        }
        let child = self.init.as_ref().map_or(self.root, |i| i.pid);
        let status = loop {
            match waitpid(Pid::from_raw(child), flags) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        };
        let exit = match status {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(WaitStatus::Exited(_, code)) => Exit::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => Exit::Signal(sig as i32),
            Ok(_) => return Ok(None),
            Err(e) => {
                return Err(Error::Sys {
                    op: "waiting for the restored tree",
                    source: e.into(),
                });
            }
        };
        // With an init, its exit code is the root's status folded into a byte; the report pipe
        // has the exact status (absent when the init itself was killed).
        let exit = match self.init.as_mut() {
            None => exit,
            Some(init) => {
                let mut buf = [0u8; 12];
                let mut got = None;
                while init.report.read_exact(&mut buf).is_ok() {
                    let r = nsinit::Record::decode(&buf);
                    if r.tag == nsinit::TAG_ROOT_DONE {
                        got = Some(Exit::from_wait_status(r.a));
                    }
                    if r.tag == nsinit::TAG_ROOT_GONE {
                        self.reaped_elsewhere = true;
                    }
                }
                got.unwrap_or(exit)
            }
        };
        self.exit = Some(exit);
        if self.reaped_elsewhere {
            return Err(Error::RootReapedElsewhere {
                ns_pid: self.ns_root,
            });
        }
        Ok(Some(exit))
    }

    /// Kill the tree (SIGKILL; with `new_pidns`, to the init, which takes the namespace down)
    /// and reap it.
    pub fn kill(&mut self) -> Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        match &self.init {
            Some(init) => {
                let _ = kill(Pid::from_raw(init.pid), Signal::SIGKILL);
            }
            None => {
                // Root first (so it forks no more), then whatever is left below it.
                let tree = pf_os::proc::tree(self.root);
                for pid in tree {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        self.wait().map(drop)
    }

    /// Whether the tree was restored lazily and still waits for pages from this process.
    pub fn owes_pages(&self) -> bool {
        self.lazy.as_ref().is_some_and(|l| l.outcome().is_none())
    }

    /// Pages served on demand so far (0 for an eager restore).
    pub fn pages_served(&self) -> u64 {
        self.lazy.as_ref().map_or(0, |l| l.pages_served())
    }

    /// For a lazy restore: wait until every page is in (`Ok(true)`), at most `timeout`
    /// (`Ok(false)` when it ran out). When serving failed the tree has been killed and this is
    /// the error that says why. An eager restore has nothing to wait for.
    pub fn wait_pages(&mut self, timeout: Option<Duration>) -> Result<bool> {
        let Some(lazy) = &self.lazy else {
            return Ok(true);
        };
        match lazy.wait(timeout) {
            None => Ok(false),
            Some(crate::lazy::LazyOutcome::Complete) => Ok(true),
            Some(crate::lazy::LazyOutcome::Failed(reason)) => {
                Err(lazy.take_error().unwrap_or(Error::LazyFailed {
                    snapshot: lazy.snapshot(),
                    reason,
                }))
            }
        }
    }

    /// Why serving a lazy restore's memory failed (the tree was killed then), if it did; the
    /// error is handed out once.
    pub fn lazy_error(&mut self) -> Option<Error> {
        let lazy = self.lazy.as_ref()?;
        match lazy.outcome()? {
            crate::lazy::LazyOutcome::Complete => None,
            crate::lazy::LazyOutcome::Failed(_) => lazy.take_error(),
        }
    }

    /// Leave the tree running, unwatched.
    ///
    /// The root (or init) stays our child: if this process keeps running, it lingers as a
    /// zombie after exiting until this process exits (then init reaps it). A CLI that detaches
    /// and exits at once leaves nothing behind.
    ///
    /// A lazily restored tree is detached only once every page is in (this waits for that): a
    /// tree that still needs pages must not outlive the process that serves them.
    pub fn detach(mut self) {
        if let Some(lazy) = &self.lazy {
            let _ = lazy.wait(None);
        }
        if let Some(init) = self.init.as_mut() {
            init.untie();
        }
        self.detached = true;
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if !self.detached
            && self.exit.is_none()
            && let Err(e) = self.kill()
        {
            tracing::warn!(pid = self.root, error = %e, "could not kill the restored tree");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_and_taken_pids() {
        assert!(wait_for_free_pids(&[i32::MAX], Instant::now()).is_ok());
        let me = std::process::id() as i32;
        let err = wait_for_free_pids(&[me], Instant::now()).expect_err("we hold it");
        assert!(
            matches!(&err, Error::PidInUse { pid, .. } if *pid == me),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("state "),
            "says what holds it: {err}"
        );
    }

    #[test]
    fn a_zombie_holding_a_pid_is_waited_out() {
        // A child that exits at once and is reaped 300 ms later, as a parent slow to reap is.
        let mut child = std::process::Command::new("true")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        while pid_state(pid) == PidState::Alive {
            std::thread::sleep(Duration::from_millis(5));
        }
        let reaper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            child.wait().expect("reap")
        });
        let start = Instant::now();
        wait_for_free_pids(&[pid], start).expect("free once reaped");
        assert!(start.elapsed() >= Duration::from_millis(250));
        assert!(reaper.join().expect("reaper").success());
    }

    /// A failed `criu restore` whose log said `errors`.
    fn criu_failed(errors: Vec<String>) -> Error {
        Error::Criu {
            action: "restore",
            exit: Exit::Code(1),
            failure: crate::criu_log::classify(errors.iter().map(String::as_str)),
            errors,
            log: "/tmp/x/criu.log".into(),
        }
    }

    #[test]
    fn a_pid_clash_is_retried_once_then_names_the_holder() {
        let clash = || {
            criu_failed(vec![
                "Error (criu/cr-restore.c:1480): Can't fork for 4242: File exists".into(),
            ])
        };
        let mut calls = 0;
        let got = retry_on_pid_clash(&[i32::MAX], || {
            calls += 1;
            if calls == 1 { Err(clash()) } else { Ok(7) }
        });
        assert_eq!((got.ok(), calls), (Some(7), 2), "retried after a clash");

        let me = std::process::id() as i32;
        let mut calls = 0;
        let err = retry_on_pid_clash(&[i32::MAX], || {
            calls += 1;
            Err::<(), _>(criu_failed(vec![format!(
                "Error (x): Can't fork for {me}: File exists"
            )]))
        })
        .expect_err("clashes twice");
        assert_eq!(calls, 2);
        assert!(
            matches!(&err, Error::PidInUse { pid, .. } if *pid == me),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("state "),
            "names the holder: {err}"
        );

        let mut calls = 0;
        let err = retry_on_pid_clash(&[i32::MAX], || {
            calls += 1;
            Err::<(), _>(criu_failed(vec!["Error (x): Restoring FAILED.".into()]))
        })
        .expect_err("another failure");
        assert_eq!(calls, 1, "other failures are not retried");
        assert!(matches!(err, Error::Criu { .. }));
    }

    #[test]
    fn a_pid_clash_in_criu_log_is_recognised() {
        let err = |lines: &[&str]| criu_failed(lines.iter().map(|l| (*l).to_owned()).collect());
        let clash = err(&[
            "Error (criu/cr-restore.c:1480): Can't fork for 1234: File exists",
            "Error (criu/cr-restore.c:2610): Restoring FAILED.",
        ]);
        assert_eq!(pid_clash(&clash), Some(1234));
        assert_eq!(pid_clash(&err(&["Error (x): Restoring FAILED."])), None);
        assert_eq!(
            pid_clash(&err(&[
                "Error (x): Can't fork for 77: Operation not permitted"
            ])),
            None
        );
    }
}
