//! [`thaw`] and [`fork`]: bring a frozen goblin back on fresh pipes, once or many times.
//!
//! How a thaw plugs new pipes in: the snapshot records the inodes of the goblin's stdin, stdout
//! and stderr pipes (`pipe:[N]`, the key CRIU gives a pipe). We create fresh pipes, hand the
//! goblin's ends to `criu restore` with `--inherit-fd fd[K]:pipe:[N]`, and keep the other ends.
//! CRIU then opens our pipes wherever the goblin had the old ones, and does not refill them with
//! the bytes it saved from the old stdin pipe — so we write those in ourselves, before the goblin
//! runs. Each copy is restored in fresh pid and mount namespaces (its own /proc), so any number
//! of copies of one snapshot run at once, beside the original, each with its original pid inside.
//!
//! A stdin or stderr that was a file CRIU reopens by its path, as it was. When it cannot (the
//! file is gone, or no longer has the size the images record: CRIU checks it for a file not
//! opened for appending, so a log the original wrote on after the freeze would fail the
//! thaw), the copy gets a pipe there instead, inherited under the file's path (the key CRIU
//! gives a file), and pf says so once per snapshot loaded.

use std::io::{PipeReader, PipeWriter, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use pf_core::{BlobStore, Digest256};
use pf_world_procs::{InheritFd, RestoreOptions};

use crate::error::{Error, NotAGoblinReason, Result};
use crate::goblin::{Goblin, Process};
use crate::stdio::{StdioKind, Streams, pipe_key};
use crate::wire::GoblinMeta;
use crate::{GOBLIN_LABEL, SHELL_LABEL};

/// A frozen goblin to thaw.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A procs blob in a store (as made by [`crate::freeze`] with [`crate::FreezeTarget::Store`]).
    Store {
        /// The store.
        store: &'a dyn BlobStore,
        /// The procs blob.
        digest: &'a Digest256,
    },
    /// An images directory with `goblin.json` beside the images.
    Images(&'a Path),
}

/// How to thaw a goblin.
#[derive(Debug, Clone)]
pub struct ThawOptions {
    /// Restore into fresh pid and mount namespaces (the goblin keeps its old pid inside and gets
    /// a new one outside). With this any number of copies, and the original, run at once.
    /// Without it the goblin takes its old pid back on the host, which fails while anything
    /// holds that pid — including the original goblin.
    pub new_pid_namespace: bool,
}

/// Where one of a thawed goblin's standard streams goes.
#[derive(Debug)]
pub enum Wire {
    /// A fresh pipe; pf keeps the other end in the returned [`Goblin`] (`stdin`, `stdout` or
    /// `stderr`).
    NewPipe,
    /// This descriptor itself, handed to the goblin in place of its old pipe: a pipe of the
    /// caller's passes straight through, with nothing copied on the way. The [`Goblin`]'s field
    /// for the stream is then `None`.
    Fd(OwnedFd),
}

/// How a thawed goblin's stdin, stdout and stderr are connected ([`Loaded::thaw_wired`]).
/// Only the streams that were pipes at freeze are wired; for a stdin or stderr that was
/// `/dev/null` or a file the wire is ignored (CRIU reopens it as it was), unless the file is gone
/// or has changed since the freeze: then it is wired as a pipe would be.
#[derive(Debug)]
pub struct Wiring {
    /// Its stdin. A [`Wire::Fd`] is refused when the snapshot holds unread stdin bytes
    /// ([`Loaded::stdin_backlog`]): they must go in first, through a new pipe.
    pub stdin: Wire,
    /// Its stdout.
    pub stdout: Wire,
    /// Its stderr. When the goblin's stdout and stderr were one pipe, they stay one: this is
    /// ignored and both go where `stdout` says.
    pub stderr: Wire,
}

impl Wiring {
    /// Three fresh pipes, as [`thaw`] gives.
    pub fn new_pipes() -> Wiring {
        Wiring {
            stdin: Wire::NewPipe,
            stdout: Wire::NewPipe,
            stderr: Wire::NewPipe,
        }
    }
}

/// Restore one copy of a frozen goblin on fresh pipes (one for each of its stdin, stdout and
/// stderr that was a pipe) and return once it runs.
///
/// A failed restore is an [`Error::Thaw`] whose source carries CRIU's own error lines. A
/// snapshot that is not a goblin's (no `goblin=v1` label, stdio not pipes) is an
/// [`Error::NotAGoblin`]. To thaw one snapshot many times, [`load`] it once instead.
pub fn thaw(source: &Source<'_>, options: &ThawOptions) -> Result<Goblin> {
    load(source)?.thaw(options)
}

/// Restore `n` copies of a frozen goblin side by side, each in its own pid and mount
/// namespaces on its own pipes. The images are read (and, from the store, extracted) once.
///
/// Either all `n` are returned running, or none is left running and the first error is
/// returned.
pub fn fork(source: &Source<'_>, n: usize) -> Result<Vec<Goblin>> {
    load(source)?.fork(n)
}

/// Check a frozen goblin and get its images ready to restore (from the store: verified and
/// extracted into a private directory on tmpfs). Thawing a [`Loaded`] goblin skips that work,
/// so an agent that thaws one snapshot again and again loads it once and keeps it.
pub fn load(source: &Source<'_>) -> Result<Loaded> {
    Loaded::new(source)
}

/// Like [`load`], for thaws whose memory is served on demand from the store ("lazy"): only
/// the small image files and the pages that cannot be served lazily are extracted; each thawed
/// copy runs as soon as CRIU has rebuilt it and gets every page it touches from the store,
/// checked against its digest, the rest following in the background. The store is shared with
/// the lazy-pages daemons of the thawed copies, which live as long as a copy still needs pages. Only
/// snapshots in the page-level format (`procs.criu.v2`) can be thawed lazily.
pub fn load_lazy(store: Arc<dyn BlobStore>, digest: &Digest256) -> Result<Loaded> {
    Loaded::new_lazy(store, digest)
}

/// Like [`load`] from a store, for a goblin thawed once (what `pf goblin thaw` does): the pages
/// files of a page-level snapshot (`procs.criu.v2`) are not extracted; each thaw streams them
/// from the store into CRIU while it restores (every page checked before CRIU gets it), so the
/// memory is never copied to tmpfs and checking it overlaps the restore. Each thaw reads and
/// checks all of it again, so a snapshot thawed or forked many times is better [`load`]ed. A
/// snapshot in the whole-archive format is loaded as by [`load`].
pub fn load_streamed(store: Arc<dyn BlobStore>, digest: &Digest256) -> Result<Loaded> {
    Loaded::new_streamed(store, digest)
}

/// [`load_lazy`] or [`load`], whichever suits the snapshot: lazy when its memory is stored page
/// by page and is at least [`pf_world_procs::LAZY_MIN_BYTES`] (32 MiB), and the kernel has
/// userfaultfd; eager otherwise. This is what `pf goblin fork` does without `--lazy` or
/// `--eager` (docs/goblins.md says why).
pub fn load_auto(store: Arc<dyn BlobStore>, digest: &Digest256) -> Result<Loaded> {
    if lazy_suits(store.as_ref(), digest)? {
        Loaded::new_lazy(store, digest)
    } else {
        Loaded::new(&Source::Store {
            store: store.as_ref(),
            digest,
        })
    }
}

/// [`load_auto`] for a goblin thawed once (what `pf goblin thaw` does without `--lazy` or
/// `--eager`): an eager thaw streams the memory from the store into CRIU ([`load_streamed`])
/// instead of extracting it first.
pub fn load_auto_once(store: Arc<dyn BlobStore>, digest: &Digest256) -> Result<Loaded> {
    if lazy_suits(store.as_ref(), digest)? {
        Loaded::new_lazy(store, digest)
    } else {
        Loaded::new_streamed(store, digest)
    }
}

/// Whether pf's choice for `digest` is a lazy thaw ([`pf_world_procs::lazy_suits`]).
fn lazy_suits(store: &dyn BlobStore, digest: &Digest256) -> Result<bool> {
    pf_world_procs::lazy_suits(store, digest).map_err(|source| Error::Thaw {
        snapshot: digest.to_string(),
        source: Box::new(source),
    })
}

/// A frozen goblin checked and ready to restore, any number of times ([`load`]). Its extracted
/// images (if it came from the store) are removed when it is dropped; goblins thawed from it
/// keep running.
#[derive(Debug)]
pub struct Loaded {
    /// The digest or directory, for messages.
    name: String,
    images: Images,
    /// Which of the goblin's stdin, stdout and stderr are pipes, by inode.
    pipes: StdioPipes,
    /// The sizes the images record for the files by path (CRIU refuses a file unless it still
    /// has them): what decides, per thaw, whether a stdin or stderr file can be reopened.
    recorded: Vec<pf_world_procs::images::PathFile>,
    /// The TCP addresses the goblin listens on: every copy listens on the same one.
    listening: Vec<std::net::SocketAddr>,
    /// The files the goblin maps shared and writable: every copy writes the same file.
    shared_files: Vec<String>,
    /// The paths the goblin listens on with unix sockets: CRIU binds each again there.
    listening_unix: Vec<std::path::PathBuf>,
    /// How many copies were thawed from this load (the second says that they share `listening`).
    thaws: std::sync::atomic::AtomicUsize,
    /// Which stdio files a thaw said it had to replace (bit 0 stdin, bit 1 stderr; said once).
    replaced_said: std::sync::atomic::AtomicU8,
    shell_job: bool,
    /// What was waiting unread in the stdin pipe at freeze.
    stdin_backlog: Vec<u8>,
}

/// The images directory: the caller's, or one extracted from the store (removed on drop).
#[derive(Debug)]
enum Images {
    Dir(std::path::PathBuf),
    Extracted(pf_world_procs::ImagesDir),
    /// Extracted for lazy thaws: memory served from the store on demand.
    Lazy(pf_world_procs::LazyImages),
    /// Extracted but for the pages files, which each thaw streams from the store into CRIU.
    Streamed(pf_world_procs::StreamedImages),
}

impl Images {
    fn path(&self) -> &Path {
        match self {
            Images::Dir(p) => p,
            Images::Extracted(d) => d.path(),
            Images::Lazy(l) => l.path(),
            Images::Streamed(s) => s.path(),
        }
    }
}

impl Loaded {
    fn new(source: &Source<'_>) -> Result<Loaded> {
        tracing::debug!("loading the snapshot");
        let (name, images, pipes, shell_job) = match *source {
            Source::Store { store, digest } => {
                let (name, procs, pipes, shell_job) = check_snapshot(store, digest)?;
                let dir = pf_world_procs::extract_images(store, &procs).map_err(|source| {
                    Error::Thaw {
                        snapshot: name.clone(),
                        source: Box::new(source),
                    }
                })?;
                (name, Images::Extracted(dir), pipes, shell_job)
            }
            Source::Images(dir) => {
                let name = dir.display().to_string();
                let meta = GoblinMeta::read(dir)?;
                let GoblinMeta::V1 {
                    stdio, shell_job, ..
                } = meta;
                let pipes = check_pipes(&stdio).map_err(|reason| Error::NotAGoblin {
                    snapshot: name.clone(),
                    reason,
                })?;
                (name, Images::Dir(dir.to_owned()), pipes, shell_job)
            }
        };
        Self::finish(name, images, pipes, shell_job)
    }

    fn new_lazy(store: Arc<dyn BlobStore>, digest: &Digest256) -> Result<Loaded> {
        tracing::debug!("loading the snapshot for lazy thaws");
        let (name, _, pipes, shell_job) = check_snapshot(store.as_ref(), digest)?;
        let images =
            pf_world_procs::extract_images_lazy(store, digest).map_err(|source| Error::Thaw {
                snapshot: name.clone(),
                source: Box::new(source),
            })?;
        Self::finish(name, Images::Lazy(images), pipes, shell_job)
    }

    fn new_streamed(store: Arc<dyn BlobStore>, digest: &Digest256) -> Result<Loaded> {
        tracing::debug!("loading the snapshot for a streamed thaw");
        let (name, _, pipes, shell_job) = check_snapshot(store.as_ref(), digest)?;
        let images = pf_world_procs::extract_images_streamed(Arc::clone(&store), digest).map_err(
            |source| Error::Thaw {
                snapshot: name.clone(),
                source: Box::new(source),
            },
        )?;
        let Some(images) = images else {
            // The whole-archive format: its images are extracted whole.
            return Loaded::new(&Source::Store {
                store: store.as_ref(),
                digest,
            });
        };
        Self::finish(name, Images::Streamed(images), pipes, shell_job)
    }

    fn finish(name: String, images: Images, pipes: StdioPipes, shell_job: bool) -> Result<Loaded> {
        // Unreadable: CRIU reads the same record, and says what is wrong with it.
        let ends = pf_world_procs::images::pipe_ends(images.path()).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the pipes the images record");
            Vec::new()
        });
        if let Some((stream, pipe)) = output_read_in_tree(&pipes, &ends) {
            return Err(Error::NotAGoblin {
                snapshot: name,
                reason: NotAGoblinReason::OutputReadInTree { stream, pipe },
            });
        }
        let stdin_backlog = match pipes.stdin {
            Some(ino) => {
                pf_world_procs::images::pipe_data(images.path(), ino).map_err(Error::PipeData)?
            }
            None => Vec::new(),
        };
        if !stdin_backlog.is_empty() {
            tracing::debug!(
                bytes = stdin_backlog.len(),
                "stdin had unread bytes at freeze"
            );
        }
        // Unreadable: CRIU reopens the files as it would have, and says why if it cannot.
        let recorded = pf_world_procs::images::path_files(images.path()).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the files the images record");
            Vec::new()
        });
        let listening = pf_world_procs::images::listening_tcp(images.path()).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the sockets the images record");
            Vec::new()
        });
        let shared_files = pf_world_procs::images::shared_writable_files(images.path())
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "cannot read the memory areas the images record");
                Vec::new()
            });
        let listening_unix =
            pf_world_procs::images::listening_unix(images.path()).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "cannot read the sockets the images record");
                Vec::new()
            });
        Ok(Loaded {
            name,
            images,
            pipes,
            recorded,
            listening,
            shared_files,
            listening_unix,
            thaws: std::sync::atomic::AtomicUsize::new(0),
            replaced_said: std::sync::atomic::AtomicU8::new(0),
            shell_job,
            stdin_backlog,
        })
    }

    /// The digest or images directory this was loaded from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether thaws of this serve memory on demand ([`load_lazy`]).
    pub fn is_lazy(&self) -> bool {
        matches!(self.images, Images::Lazy(_))
    }

    /// The bytes that were waiting unread in the goblin's stdin pipe when it was frozen; every
    /// thawed copy reads them first.
    pub fn stdin_backlog(&self) -> &[u8] {
        &self.stdin_backlog
    }

    /// Restore one copy on fresh pipes and return once it runs (see [`thaw`]).
    pub fn thaw(&self, options: &ThawOptions) -> Result<Goblin> {
        self.thaw_one(options.new_pid_namespace, Wiring::new_pipes(), false)
    }

    /// Restore one copy with its stdin, stdout and stderr connected as `wiring` says, and
    /// return once it runs. `pf goblin thaw` passes its own stdin and stdout through this way
    /// when they are pipes.
    pub fn thaw_wired(&self, options: &ThawOptions, wiring: Wiring) -> Result<Goblin> {
        self.thaw_one(options.new_pid_namespace, wiring, false)
    }

    /// Restore `n` copies side by side (see [`fork`]).
    pub fn fork(&self, n: usize) -> Result<Vec<Goblin>> {
        let _span = tracing::info_span!("fork", n, snapshot = %self.name).entered();
        // A restore spends much of its time waiting (forks, namespace setup, page faults), so
        // two restores per core keep the cores busy. Measured on 2 cores, 8 clones of a 64 MiB
        // goblin with raw criu: 0.95 s one at a time, 0.50 s two at a time, 0.35-0.39 s four or
        // more.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = (2 * cores).clamp(1, n.max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<(usize, Result<Goblin>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            let result = self.thaw_one(true, Wiring::new_pipes(), n > 1);
                            let failed = result.is_err();
                            mine.push((i, result));
                            if failed {
                                // Stop handing out work: the caller gets an error either way.
                                next.store(n, std::sync::atomic::Ordering::Relaxed);
                                break;
                            }
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        results.sort_by_key(|(i, _)| *i);
        let mut goblins = Vec::with_capacity(n);
        for (_, result) in results {
            // On the first error the goblins gathered so far are dropped: killed and reaped.
            goblins.push(result?);
        }
        if goblins.len() != n {
            return Err(Error::sys(
                format!("fork {n} goblins"),
                std::io::Error::other("a restore thread panicked"),
            ));
        }
        Ok(goblins)
    }

    /// The key CRIU knows the copy's stdin or stderr (`stream`, bit `bit` of `replaced_said`)
    /// by when it is handed a descriptor there: its pipe's (`ino`), or, for a file (`file`) CRIU
    /// could not reopen as it was, or that the copies of a fork (`many`) would each reopen, the
    /// file's path; `None` to let CRIU reopen it.
    ///
    /// CRIU hands a descriptor given under a file's path to every descriptor of the tree with
    /// that path: only a path that is this stream's alone (one entry in `files.img`, not both
    /// stdin and stderr) is replaced; any other is CRIU's to reopen, or the thaw's check of the
    /// files to name.
    fn stream_key(
        &self,
        (stream, bit): (&str, u8),
        ino: Option<u64>,
        file: &Option<String>,
        many: bool,
    ) -> Option<String> {
        if let Some(ino) = ino {
            return Some(pipe_key(ino));
        }
        let path = file.as_deref()?;
        let entries: Vec<&pf_world_procs::images::PathFile> =
            self.recorded.iter().filter(|f| f.name == path).collect();
        if entries.len() > 1 || self.pipes.stdin_file == self.pipes.stderr_file {
            return None;
        }
        let why = file_unusable(path, &entries).or_else(|| {
            (many && entries.iter().any(|f| f.size.is_some())).then(|| {
                "the copies of a fork cannot each reopen as it was (CRIU checks its size, which \
                 the first copy's writes change)"
                    .to_owned()
            })
        })?;
        let said = self
            .replaced_said
            .fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
        if said & bit == 0 {
            tracing::warn!(
                "the goblin's {stream} was {path}, which {why}: a thawed copy gets a new pipe \
                 there instead"
            );
        }
        // CRIU's name for a file: its path without the leading slash.
        Some(path.strip_prefix('/').unwrap_or(path).to_owned())
    }

    /// Restore one copy, wired as asked.
    fn thaw_one(&self, new_pid_namespace: bool, wiring: Wiring, many: bool) -> Result<Goblin> {
        let stdout_ino = self.pipes.stdout;
        let stdin_key =
            self.stream_key(("stdin", 1), self.pipes.stdin, &self.pipes.stdin_file, many);
        let stderr_key = self.stream_key(
            ("stderr", 2),
            self.pipes.stderr,
            &self.pipes.stderr_file,
            many,
        );
        // A stdio file replaced by a pipe is not reopened; every other file is, by its path.
        let replaced = |path: &str| {
            [
                (&stdin_key, &self.pipes.stdin_file),
                (&stderr_key, &self.pipes.stderr_file),
            ]
            .iter()
            .any(|(key, file)| key.is_some() && file.as_deref() == Some(path))
        };
        let mut changed = changed_files(&self.recorded, &replaced);
        changed.extend(socket_dirs_gone(&self.listening_unix));
        if !changed.is_empty() {
            return Err(Error::FilesChanged {
                snapshot: self.name.clone(),
                files: changed,
            });
        }
        let second = self
            .thaws
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            == 1;
        if second && !self.listening.is_empty() {
            let addrs: Vec<String> = self.listening.iter().map(ToString::to_string).collect();
            tracing::warn!(
                "the goblin listens on TCP {}: every copy listens on that same address (and \
                 the original, while it runs), and the kernel hands each new connection to any \
                 one of them, so a copy may not get the connections it expects; give each copy \
                 a port of its own after the thaw (close the socket and listen again on port 0)",
                addrs.join(", ")
            );
        }
        if second && !self.shared_files.is_empty() {
            tracing::warn!(
                "the goblin maps {} shared and writable: every copy maps that same file (and \
                 the original, while it runs), so what one copy writes there the others see; \
                 give each copy a file of its own after the thaw",
                self.shared_files.join(", ")
            );
        }
        let mut inherit = Vec::with_capacity(3);
        let stdin_w = match (stdin_key, wiring.stdin) {
            // Not a pipe: CRIU reopens it as it was (a file by its path, /dev/null).
            (None, _) => None,
            (Some(stdin_key), Wire::NewPipe) => {
                let (r, mut w) = pipe("stdin")?;
                if !self.stdin_backlog.is_empty() {
                    fill(&mut w, &self.stdin_backlog)?;
                }
                inherit.push(inherit_fd(r.into(), stdin_key));
                Some(w)
            }
            (Some(_), Wire::Fd(_)) if !self.stdin_backlog.is_empty() => {
                return Err(Error::StdinBacklog {
                    snapshot: self.name.clone(),
                    bytes: self.stdin_backlog.len(),
                });
            }
            (Some(stdin_key), Wire::Fd(fd)) => {
                inherit.push(inherit_fd(fd, stdin_key));
                None
            }
        };
        let stdout_r = match wiring.stdout {
            Wire::NewPipe => {
                let (r, w) = pipe("stdout")?;
                inherit.push(inherit_fd(w.into(), pipe_key(stdout_ino)));
                Some(r)
            }
            Wire::Fd(fd) => {
                inherit.push(inherit_fd(fd, pipe_key(stdout_ino)));
                None
            }
        };
        let stderr_r = match (stderr_key, wiring.stderr) {
            (None, _) => None,
            (Some(key), _) if key == pipe_key(stdout_ino) => None,
            (Some(stderr_key), Wire::NewPipe) => {
                let (r, w) = pipe("stderr")?;
                inherit.push(inherit_fd(w.into(), stderr_key));
                Some(r)
            }
            (Some(stderr_key), Wire::Fd(fd)) => {
                inherit.push(inherit_fd(fd, stderr_key));
                None
            }
        };
        let options = RestoreOptions {
            new_pidns: new_pid_namespace,
            shell_job: self.shell_job,
            join_session: false,
            inherit,
            extra_args: Vec::new(),
        };
        let restored = match &self.images {
            Images::Lazy(images) => pf_world_procs::restore_lazy(images, options),
            Images::Streamed(images) => pf_world_procs::restore_streamed(images, options),
            images => pf_world_procs::restore_dir(images.path(), options),
        }
        .map_err(|source| Error::Thaw {
            snapshot: self.name.clone(),
            source: Box::new(source),
        })?;
        let mut pid = restored.pid();
        // In our pid namespace the root is our child, not reaped until we wait for it. In a
        // namespace of its own its reaper is the namespace's init: a goblin that answered its
        // input and exited right after the restore may be reaped already, and then the init
        // (our child, which holds its exit status until we wait) stands for it, as it does when
        // the root exits before the restore is over.
        let init = restored
            .init_pid()
            .map(|init| {
                pf_os::fd::pidfd_open(init).map(Arc::new).map_err(|e| {
                    Error::sys(format!("open a pidfd for the init {init} of a goblin"), e)
                })
            })
            .transpose()?;
        let pidfd = match pf_os::fd::pidfd_open(pid) {
            Ok(fd) => Ok(fd),
            Err(e)
                if e.raw_os_error() == Some(libc::ESRCH)
                    && let Some(init) = &init =>
            {
                pid = restored.init_pid().unwrap_or(pid);
                tracing::debug!(init = pid, "the thawed goblin has exited already");
                init.try_clone()
            }
            Err(e) => Err(e),
        }
        .map_err(|e| Error::sys(format!("open a pidfd for goblin {pid}"), e))?;
        // The root gone by the time criu was done, or by now: the init's pid stands for it.
        let stands_in = restored.init_pid() == Some(pid);
        tracing::info!(pid, ns_pid = restored.ns_pid(), snapshot = %self.name, "thawed goblin");
        let goblin = Goblin::new(
            pid,
            pidfd,
            Process::Thawed(Box::new(restored)),
            stdin_w,
            stdout_r,
            stderr_r,
        );
        Ok(match init {
            Some(init) => goblin.in_tree(crate::goblin::Tree { init, stands_in }),
            None => goblin,
        })
    }
}

/// The procs record `digest` of `store`, checked to be a goblin's: its name for messages, the
/// record, its stdio pipes and whether it was a shell job.
fn check_snapshot(
    store: &dyn BlobStore,
    digest: &Digest256,
) -> Result<(String, pf_world_procs::CriuProcs, StdioPipes, bool)> {
    let name = digest.to_string();
    let blob = pf_world_procs::load_procs(store, digest).map_err(|source| Error::Thaw {
        snapshot: name.clone(),
        source: Box::new(source),
    })?;
    let procs = match blob {
        pf_world_procs::ProcsBlob::Criu(procs) => procs,
        pf_world_procs::ProcsBlob::Unsupported {
            unsupported_on,
            note,
        } => {
            return Err(Error::NotAGoblin {
                snapshot: name,
                reason: NotAGoblinReason::NoImages {
                    unsupported_on,
                    note,
                },
            });
        }
    };
    if procs.labels.get(GOBLIN_LABEL.0).map(String::as_str) != Some(GOBLIN_LABEL.1) {
        let shell = procs.labels.get(SHELL_LABEL.0).map(String::as_str) == Some(SHELL_LABEL.1);
        return Err(Error::NotAGoblin {
            snapshot: name,
            reason: if shell {
                NotAGoblinReason::Shell
            } else {
                NotAGoblinReason::NoGoblinLabel
            },
        });
    }
    let pipes = check_pipes(&procs.stdio).map_err(|reason| Error::NotAGoblin {
        snapshot: name.clone(),
        reason,
    })?;
    let shell_job = procs.options.as_ref().is_some_and(|o| o.shell_job);
    Ok((name, procs, pipes, shell_job))
}

/// The files of `recorded` (the files the images reopen by their path) that CRIU would refuse
/// now, each with why ([`file_unusable`]), less those `replaced` says the thaw does not reopen.
/// `/proc` is not ours to look at: a copy's is its own pid namespace's, and CRIU remaps a
/// `/proc` file of a dead pid itself.
fn changed_files(
    recorded: &[pf_world_procs::images::PathFile],
    replaced: &dyn Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for file in recorded {
        let path = file.name.as_str();
        if path.starts_with("/proc/")
            || !path.starts_with('/')
            || replaced(path)
            || out.iter().any(|(p, _)| p == path)
        {
            continue;
        }
        let entries: Vec<&pf_world_procs::images::PathFile> =
            recorded.iter().filter(|f| f.name == path).collect();
        if let Some(why) = file_unusable(path, &entries) {
            out.push((path.to_owned(), why));
        }
    }
    out
}

/// The unix socket paths of `listening` whose directory is gone, each with why: CRIU binds a
/// listening socket again at its path, and cannot in a directory that is gone (Python's
/// `multiprocessing.Manager()` listens in a `/tmp/pymp-…` directory that its process removes
/// when it exits, so once a thawed copy ended no thaw could bind its socket).
fn socket_dirs_gone(listening: &[std::path::PathBuf]) -> Vec<(String, String)> {
    listening
        .iter()
        .filter_map(|path| {
            let dir = path.parent()?;
            match std::fs::metadata(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some((
                    path.display().to_string(),
                    format!(
                        "is a unix socket it listens on, in {} which is gone (create that \
                         directory again)",
                        dir.display()
                    ),
                )),
                _ => None,
            }
        })
        .collect()
}

fn inherit_fd(fd: OwnedFd, key: String) -> InheritFd {
    InheritFd { fd, key }
}

/// Why CRIU could not reopen the file `path` as it was, if it could not: it is gone, or it no
/// longer has a size or a mode the images record for it (`recorded`, its entries in
/// `files.img`: CRIU records a size for a regular file not opened write-only for appending, and
/// a mode, and refuses the file unless it still has them).
fn file_unusable(path: &str, recorded: &[&pf_world_procs::images::PathFile]) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let directory = recorded
        .iter()
        .any(|f| f.mode.is_some_and(|m| m & libc::S_IFMT == libc::S_IFDIR));
    match std::fs::metadata(path) {
        // A directory: most often the one it was started in (`--cwd`), moved or removed since.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && directory => Some(
            "is gone: a directory it worked in (or had open); make it again (`mkdir -p`) or put \
             it back"
                .to_owned(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("is gone".to_owned()),
        // Unreadable for another reason: CRIU tries, and says what it finds.
        Err(_) => None,
        Ok(now) => recorded.iter().find_map(|then| {
            if let Some(mode) = then.mode
                && mode != now.mode()
            {
                return Some(format!(
                    "has changed since the freeze (mode {mode:o} then, {:o} now)",
                    now.mode()
                ));
            }
            let size = then.size?;
            (size != now.len()).then(|| {
                format!(
                    "has changed since the freeze ({size} bytes then, {} now)",
                    now.len()
                )
            })
        }),
    }
}

fn pipe(which: &str) -> Result<(PipeReader, PipeWriter)> {
    std::io::pipe().map_err(|e| Error::sys(format!("create the {which} pipe"), e))
}

/// Put `bytes` into the empty pipe behind `w` without blocking: grow the pipe first if they do
/// not fit its default 64 KiB. (They fit the pipe they came from, which had the same limits.)
fn fill(w: &mut PipeWriter, bytes: &[u8]) -> Result<()> {
    use nix::fcntl::{FcntlArg, fcntl};
    let capacity = fcntl(w.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| Error::sys("read the stdin pipe's size", e.into()))?;
    let capacity = usize::try_from(capacity).unwrap_or(0);
    if bytes.len() > capacity {
        let want = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(want)).map_err(|e| {
            Error::sys(
                format!("grow the stdin pipe to hold {} unread bytes", bytes.len()),
                e.into(),
            )
        })?;
    }
    w.write_all(bytes)
        .map_err(|e| Error::sys("write the unread stdin bytes into the new stdin pipe", e))
}

/// The pipe inodes of a goblin's stdio: its stdout is always a pipe; its stdin and stderr are
/// pipes (`Some`) or something CRIU reopens by itself (`None`: a file, `/dev/null`, closed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct StdioPipes {
    stdin: Option<u64>,
    stdout: u64,
    stderr: Option<u64>,
    /// The path of a stdin that was a file opened by its path (not a pipe, not a deleted file).
    stdin_file: Option<String>,
    /// The same for stderr.
    stderr_file: Option<String>,
}

/// The pipes of a recorded stdio, or why it is not a goblin's.
fn check_pipes(stdio: &[String]) -> std::result::Result<StdioPipes, NotAGoblinReason> {
    let mut streams = Streams::from_links(stdio).ok_or(if stdio.is_empty() {
        NotAGoblinReason::NoStdio
    } else {
        NotAGoblinReason::StdioCount { found: stdio.len() }
    })?;
    // A named pipe is recorded by its path, as a file is; a pf older than the freeze's FIFO
    // refusal froze such goblins, and CRIU would reopen that FIFO in the copy, whose stdin pf
    // could then never reach. What the path is now is all the record lets us go by.
    for kind in &mut streams.0 {
        if let StdioKind::File(path) = kind
            && is_fifo(path)
        {
            *kind = StdioKind::Fifo(std::mem::take(path));
        }
    }
    let not_pipes = || NotAGoblinReason::NotPipes {
        streams: streams.clone(),
    };
    if crate::freeze::stdio_problem(&streams).is_some() {
        return Err(not_pipes());
    }
    let pipe = |k: &StdioKind| match k {
        StdioKind::Pipe(ino) => Some(*ino),
        _ => None,
    };
    // A deleted file is kept in the images (a ghost): CRIU recreates it whatever is there now.
    let file = |k: &StdioKind| match k {
        StdioKind::File(path) if !path.ends_with(" (deleted)") => Some(path.clone()),
        _ => None,
    };
    let [stdin, stdout, stderr] = &streams.0;
    let pipes = StdioPipes {
        stdin: pipe(stdin),
        stdout: pipe(stdout).ok_or_else(not_pipes)?,
        stderr: pipe(stderr),
        stdin_file: file(stdin),
        stderr_file: file(stderr),
    };
    if let Some(ino) = pipes.stdin
        && (Some(ino) == Some(pipes.stdout) || Some(ino) == pipes.stderr)
    {
        return Err(NotAGoblinReason::StdinIsOutput { pipe: ino });
    }
    Ok(pipes)
}

/// The goblin's output stream (`"stdout"` or `"stderr"`) and pipe that a process of its own
/// tree read at the freeze, from the pipe ends the images record. CRIU reopens every end of an
/// inherited pipe from the descriptor a thaw gives it, so that reader's copy would share the
/// thaw's stdout with pf and take the answers.
fn output_read_in_tree(
    pipes: &StdioPipes,
    ends: &[pf_world_procs::images::PipeEnd],
) -> Option<(&'static str, u64)> {
    [("stdout", Some(pipes.stdout)), ("stderr", pipes.stderr)]
        .into_iter()
        .filter_map(|(stream, pipe)| Some((stream, pipe?)))
        .find(|&(_, pipe)| ends.iter().any(|e| e.pipe == pipe && e.reads()))
}

/// Whether `path` names a FIFO now (`false` when it cannot be read).
fn is_fifo(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_file_is_unusable_when_gone_or_not_the_size_or_mode_recorded() {
        use pf_world_procs::images::PathFile;
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("err.log");
        std::fs::write(&log, b"abc").expect("write");
        let mode = std::fs::metadata(&log).expect("stat").mode();
        let log = log.display().to_string();
        let entry = |size: Option<u64>, mode: Option<u32>| PathFile {
            name: log.clone(),
            flags: 1,
            size,
            mode,
        };
        let unusable = |e: PathFile| file_unusable(&log, &[&e]);
        assert_eq!(unusable(entry(Some(3), Some(mode))), None, "as it was");
        assert_eq!(
            unusable(entry(None, None)),
            None,
            "nothing recorded: appended to"
        );
        assert_eq!(
            unusable(entry(Some(0), Some(mode))).as_deref(),
            Some("has changed since the freeze (0 bytes then, 3 now)")
        );
        assert_eq!(
            unusable(entry(Some(3), Some(mode ^ 0o022))),
            Some(format!(
                "has changed since the freeze (mode {:o} then, {mode:o} now)",
                mode ^ 0o022
            ))
        );
        // A directory where the file was: another type, so another mode.
        std::fs::remove_file(&log).expect("rm");
        std::fs::create_dir(&log).expect("mkdir");
        assert!(
            unusable(entry(Some(3), Some(mode)))
                .is_some_and(|why| why.starts_with("has changed since the freeze (mode")),
        );
        let gone = dir.path().join("gone").display().to_string();
        assert_eq!(file_unusable(&gone, &[]).as_deref(), Some("is gone"));
        let cwd = PathFile {
            name: gone.clone(),
            flags: 0,
            size: None,
            mode: Some(libc::S_IFDIR | 0o755),
        };
        assert!(
            file_unusable(&gone, &[&cwd])
                .is_some_and(|why| why.starts_with("is gone: a directory it worked in")),
        );
    }

    #[test]
    fn files_reopened_by_path_that_changed_or_went_are_named_once() {
        use pf_world_procs::images::PathFile;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data.csv");
        std::fs::write(&data, b"1\n2\n").expect("write");
        let data = data.display().to_string();
        let gone = dir.path().join("psm_1").display().to_string();
        let file = |name: &str, size: Option<u64>| PathFile {
            name: name.to_owned(),
            flags: 0,
            size,
            mode: None,
        };
        let recorded = vec![
            file(&data, Some(2)),
            file(&data, Some(2)),
            file(&gone, Some(4096)),
            file("/dev/null", None),
            file("/proc/4242/status", Some(0)),
        ];
        let none = |_: &str| false;
        assert_eq!(
            changed_files(&recorded, &none),
            vec![
                (
                    data.clone(),
                    "has changed since the freeze (2 bytes then, 4 now)".to_owned()
                ),
                (gone.clone(), "is gone".to_owned()),
            ]
        );
        assert_eq!(
            changed_files(&recorded, &|p: &str| p == data || p == gone),
            vec![],
            "a stdio file handed a pipe is not reopened"
        );
        assert_eq!(
            changed_files(&[file(&data, Some(4)), file(&gone, None)][..1], &none),
            vec![],
            "the size it has"
        );
    }

    #[test]
    fn a_listening_unix_socket_whose_directory_went_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = dir.path().join("listener");
        let gone = dir.path().join("pymp-1").join("listener");
        assert_eq!(
            socket_dirs_gone(&[here, gone.clone()]),
            vec![(
                gone.display().to_string(),
                format!(
                    "is a unix socket it listens on, in {} which is gone (create that directory \
                     again)",
                    dir.path().join("pymp-1").display()
                )
            )]
        );
    }

    #[test]
    fn accepts_three_pipes_or_shared_output() {
        assert_eq!(
            check_pipes(&links(&["pipe:[1]", "pipe:[2]", "pipe:[3]"])),
            Ok(StdioPipes {
                stdin: Some(1),
                stdout: 2,
                stderr: Some(3),
                stdin_file: None,
                stderr_file: None,
            })
        );
        assert_eq!(
            check_pipes(&links(&["pipe:[1]", "pipe:[2]", "pipe:[2]"])),
            Ok(StdioPipes {
                stdin: Some(1),
                stdout: 2,
                stderr: Some(2),
                stdin_file: None,
                stderr_file: None,
            })
        );
        // Python's `Popen(stdin=PIPE, stdout=PIPE, stderr=DEVNULL)`, and a closed stdin.
        assert_eq!(
            check_pipes(&links(&["pipe:[1]", "pipe:[2]", "/dev/null"])),
            Ok(StdioPipes {
                stdin: Some(1),
                stdout: 2,
                stderr: None,
                stdin_file: None,
                stderr_file: Some("/dev/null".into()),
            })
        );
        assert_eq!(
            check_pipes(&links(&["", "pipe:[2]", "/var/log/app.log"])),
            Ok(StdioPipes {
                stdin: None,
                stdout: 2,
                stderr: None,
                stdin_file: None,
                stderr_file: Some("/var/log/app.log".into()),
            })
        );
        // A deleted file is CRIU's to recreate from the images.
        assert_eq!(
            check_pipes(&links(&["/tmp/in (deleted)", "pipe:[2]", "pipe:[3]"]))
                .map(|p| p.stdin_file),
            Ok(None)
        );
    }

    #[test]
    fn an_output_read_inside_the_tree_is_found_from_the_pipe_ends() {
        use pf_world_procs::images::PipeEnd;
        let pipes = check_pipes(&links(&["pipe:[1]", "pipe:[2]", "pipe:[3]"])).expect("pipes");
        let (r, w) = (libc::O_RDONLY as u32, libc::O_WRONLY as u32 | 0o100_000);
        let end = |pipe, flags| PipeEnd { pipe, flags };
        // Its own ends, and a child sharing its stdout and writing its stdin: fine.
        let own = [end(1, r), end(2, w), end(3, w), end(2, w), end(1, w)];
        assert_eq!(output_read_in_tree(&pipes, &own), None);
        let mut cat = own.to_vec();
        cat.push(end(3, r));
        assert_eq!(output_read_in_tree(&pipes, &cat), Some(("stderr", 3)));
        cat.push(end(2, libc::O_RDWR as u32));
        assert_eq!(output_read_in_tree(&pipes, &cat), Some(("stdout", 2)));
        let reason = NotAGoblinReason::OutputReadInTree {
            stream: "stdout",
            pipe: 2,
        };
        assert!(
            reason
                .to_string()
                .contains("its stdout (pipe:[2]) was read by a process of its own tree"),
            "{reason}"
        );
    }

    #[test]
    fn explains_why_a_recorded_stdio_is_not_a_goblins() {
        let why = |links: &[String]| check_pipes(links).map_err(|r| r.to_string());
        assert_eq!(
            why(&[]),
            Err("it records no stdin/stdout/stderr".to_owned())
        );
        assert_eq!(check_pipes(&[]), Err(NotAGoblinReason::NoStdio));
        assert_eq!(
            why(&links(&["pipe:[1]"])),
            Err("it records 1 stdio entries instead of 3".to_owned())
        );
        assert_eq!(
            why(&links(&["/dev/pts/0", "pipe:[2]", "pipe:[3]"])),
            Err(
                "its stdin is a terminal (/dev/pts/0), stdout is a pipe (pipe:[2]), stderr is a \
                 pipe (pipe:[3]); a terminal cannot be handed to a thawed copy (freeze a job on \
                 a terminal with `pf shell freeze`)"
                    .to_owned()
            )
        );
        assert_eq!(
            check_pipes(&links(&["pipe:[1]", "pipe:[1]", "pipe:[3]"])),
            Err(NotAGoblinReason::StdinIsOutput { pipe: 1 })
        );
        assert!(
            why(&links(&["pipe:[1]", "/dev/null", "pipe:[3]"]))
                .expect_err("stdout a file")
                .contains("stdout must be a pipe")
        );
        assert!(
            why(&links(&["pipe:[1]", "pipe:[1]", "pipe:[3]"]))
                .expect_err("same pipe")
                .contains("same pipe as its output (pipe:[1])")
        );
    }

    #[test]
    fn a_recorded_stdin_that_is_a_named_pipe_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("in");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo: {made}");
        let fifo = fifo.display().to_string();
        let why = check_pipes(&links(&[&fifo, "pipe:[2]", "pipe:[3]"]))
            .expect_err("a FIFO stdin")
            .to_string();
        assert!(
            why.starts_with(&format!("its stdin is a named pipe ({fifo})")),
            "{why}"
        );
        assert!(why.contains("CRIU reopens a named pipe by path"), "{why}");
        // A regular file at a recorded path is still a file CRIU reopens.
        let file = dir.path().join("log");
        std::fs::write(&file, b"").expect("write");
        let file = file.display().to_string();
        assert!(check_pipes(&links(&["pipe:[1]", "pipe:[2]", &file])).is_ok());
    }

    #[test]
    fn fill_grows_the_pipe_for_a_large_backlog() {
        let (mut r, mut w) = pipe("test").expect("pipe");
        let backlog: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fill(&mut w, &backlog).expect("fill without blocking");
        drop(w);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut got).expect("read");
        assert_eq!(got, backlog);
    }
}
