//! Capture: `criu dump` of a process tree into a private scratch directory, then the images as a
//! deterministic tar streamed into the store, then the procs JSON blob that names it.
//!
//! Nothing is written to the store until criu has succeeded, and the procs blob (the only thing
//! a caller could name) is written last, so a failed capture leaves no blob a name could point
//! at. Without a usable criu, capture stores an honest `procs.unsupported.v1` placeholder.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use pf_core::{BlobStore, Digest256};

use crate::criu::{Criu, CriuVersion, Unavailable};
use crate::criu_log::CriuFailure;
use crate::error::{Error, Result};
use crate::runner::{Invocation, push_opt};
use crate::tarball::ImagesTar;
use crate::wire::{CriuProcs, DumpOptions, DumpStats, ProcsBlob};
use pf_os::proc::{PidState, pid_state};

/// How long one `criu dump` may take before it is killed.
const DUMP_DEADLINE: Duration = Duration::from_secs(600);
/// How long a dump waits for the memory a lazy restore still serves to be all in.
const LAZY_WAIT: Duration = Duration::from_secs(60);

/// How to dump a process tree. There is no `Default`: say what you want.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Keep the tree running after the dump (`--leave-running`); otherwise it is killed once
    /// the snapshot is stored (a capture that fails lets it run on).
    pub leave_running: bool,
    /// The tree is a job of a shell: its session or terminal is outside it (`--shell-job`).
    pub shell_job: bool,
    /// Dump established TCP connections (`--tcp-established`).
    pub tcp_established: bool,
    /// Allow unix sockets connected to peers outside the tree (`--ext-unix-sk`).
    pub ext_unix_sk: bool,
    /// Dump file locks (`--file-locks`).
    pub file_locks: bool,
    /// Labels recorded in the procs blob.
    pub labels: BTreeMap<String, String>,
    /// More arguments for `criu dump`.
    pub extra_args: Vec<String>,
}

/// What a dump into a directory did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpReport {
    /// The tree's pids just before the dump, root first.
    pub pids: Vec<i32>,
    /// `readlink /proc/<root>/fd/{0,1,2}` just before the dump (empty string: closed).
    pub stdio: Vec<String>,
    /// The criu that dumped.
    pub criu_version: CriuVersion,
    /// CRIU's statistics of this dump (`None` if its `stats-dump` was missing or unreadable:
    /// they are informational, so that does not fail the dump).
    pub dump_stats: Option<DumpStats>,
}

/// A finished capture: the procs blob's digest and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The digest of the procs JSON blob.
    pub procs: Digest256,
    /// The blob (`Unsupported` when nothing could be dumped here).
    pub blob: ProcsBlob,
}

impl Captured {
    /// CRIU's statistics of the dump (`frozen_time_us` is the tree's pause), when it left them.
    pub fn dump_stats(&self) -> Option<&DumpStats> {
        match &self.blob {
            ProcsBlob::Criu(procs) => procs.dump_stats.as_ref(),
            ProcsBlob::Unsupported { .. } => None,
        }
    }
}

/// Where a capture is, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaptureProgress {
    /// criu is dumping.
    Dumping,
    /// The images are streaming into the store.
    Storing {
        /// Tar bytes stored so far.
        done: u64,
        /// Tar bytes in all.
        total: u64,
    },
}

/// Dump `pid`'s tree into `images_dir`: plain CRIU images, nothing else (criu's log and stats
/// go to a work directory of their own). The directory is made (private, 0700: images hold the
/// process's memory) when it does not exist; one that holds anything is refused, so two dumps
/// never mix.
pub fn dump_to_dir(pid: i32, images_dir: &Path, opts: &CaptureOptions) -> Result<DumpReport> {
    let criu = crate::criu::for_capture()?;
    ensure_alive(pid)?;
    ensure_not_ours(pid)?;
    ensure_not_traced(pid)?;
    wait_for_lazy_memory(&pf_os::proc::tree(pid))?;
    prepare_images_dir(images_dir)?;
    let (report, stopped) = dump_with(&criu, pid, images_dir, opts, &[])?;
    if let Some(stopped) = stopped {
        stopped.kill();
    }
    Ok(report)
}

/// Make `dir` (0700) if it is missing; refuse it if it holds anything.
fn prepare_images_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::ImagesDirNotEmpty {
                    path: dir.to_owned(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("create the images directory", dir, e)),
        Err(e) => Err(Error::io("read the images directory", dir, e)),
    }
}

/// Dump `pid`'s tree, stream the images into `store`, store the procs blob; return its digest.
///
/// Without a usable criu (or off Linux) this stores and returns a `procs.unsupported.v1`
/// placeholder whose note says which check failed.
pub fn capture(store: &dyn BlobStore, pid: i32, opts: &CaptureOptions) -> Result<Captured> {
    capture_with_progress(store, pid, opts, &mut |_| {})
}

/// [`capture`], reporting progress.
pub fn capture_with_progress(
    store: &dyn BlobStore,
    pid: i32,
    opts: &CaptureOptions,
    progress: &mut dyn FnMut(CaptureProgress),
) -> Result<Captured> {
    let _span = tracing::info_span!("capture", pid).entered();
    let criu = match crate::criu::for_capture() {
        Ok(criu) => criu,
        Err(why) => {
            if cfg!(target_os = "linux") {
                ensure_alive(pid)?;
            }
            return store_placeholder(store, pid, &why);
        }
    };
    ensure_alive(pid)?;
    ensure_not_ours(pid)?;
    ensure_not_traced(pid)?;
    // Before the store's lock (a gc waits on it) and before `should_stream` looks at how much
    // of the tree's memory is in.
    wait_for_lazy_memory(&pf_os::proc::tree(pid))?;
    let format = crate::v2::format_from_env()?;
    // Shared from the dump blob to the procs blob that refers to it, so a gc cannot remove the
    // dump in between; a caller that names the procs blob holds its own from before this call.
    let _writing = store
        .writer_lock()
        .map_err(|e| Error::store(format!("locking the store to capture pid {pid}"), e))?;
    let images = scratch_dir("pf-dump-")?;
    progress(CaptureProgress::Dumping);
    // v2 hashes the pages while CRIU dumps them: streamed through pf, or followed in the dir.
    // Streamed from `STREAM_FROM` (128 MiB) of tree memory or when the images dir lacks the
    // room for it (only the pages the store lacks are written anywhere), else into the images
    // dir, where CRIU writes at its own pace and pf follows the pages files.
    let streamed = (format == crate::v2::Format::V2)
        .then(|| crate::capture_stream::should_stream(pid, images.path()))
        .flatten()
        .and_then(|sample| crate::capture_stream::prepare().map(|hold| (hold, sample)));
    let ((report, stopped), early) = if let Some((hold, sample)) = streamed {
        let (report, pages) = crate::capture_stream::capture_while(
            hold,
            store,
            (
                images.path(),
                crate::capture_stream::prepack_on(),
                Some((pid, sample)),
            ),
            |extra| dump_with(&criu, pid, images.path(), opts, extra),
        )?;
        (report, crate::v2::Early::Streamed(pages))
    } else {
        let prehash =
            (format == crate::v2::Format::V2).then(|| crate::v2::Prehash::start(images.path()));
        let over = std::sync::atomic::AtomicBool::new(false);
        let (report, base) = std::thread::scope(|s| {
            let guesser = prehash.as_ref().and_then(|prehash| {
                std::thread::Builder::new()
                    .name("pf-base".into())
                    .spawn_scoped(s, || crate::v2::early_base(store, prehash, &over))
                    .inspect_err(
                        |e| tracing::debug!(error = %e, "no thread to read the base early"),
                    )
                    .ok()
            });
            // Also if the dump panics: the scope waits for the guesser, which waits for this.
            let ended = crate::v2::SetOnDrop(&over);
            let report = dump_with(&criu, pid, images.path(), opts, &[]);
            drop(ended);
            let base = guesser.and_then(|g| g.join().ok().flatten());
            (report, base)
        });
        let report = report?;
        let prehashed = prehash.map(crate::v2::Prehash::finish).unwrap_or_default();
        (
            report,
            crate::v2::Early::Followed(prehashed, base.map(Box::new)),
        )
    };
    let (criu_dump, memory) = match format {
        crate::v2::Format::V1 => (store_tar(store, pid, images.path(), progress)?, None),
        crate::v2::Format::V2 => {
            progress(CaptureProgress::Storing { done: 0, total: 0 });
            let (tar, memory) = crate::v2::store_images(store, images.path(), pid, early)?;
            (tar, Some(memory))
        }
    };
    drop(images);
    let blob = ProcsBlob::Criu(CriuProcs {
        criu_dump,
        pids: report.pids,
        root_pid: Some(pid),
        criu_version: Some(report.criu_version.to_string()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_owned()),
        arch: Some(std::env::consts::ARCH.to_owned()),
        captured_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
        options: Some(DumpOptions {
            leave_running: opts.leave_running,
            shell_job: opts.shell_job,
            tcp_established: opts.tcp_established,
            ext_unix_sk: opts.ext_unix_sk,
            file_locks: opts.file_locks,
            extra_args: opts.extra_args.clone(),
        }),
        stdio: report.stdio,
        labels: opts.labels.clone(),
        dump_stats: report.dump_stats,
        memory,
    });
    let procs = store
        .put(&blob.to_json())
        .map_err(|e| Error::store(format!("storing the procs blob of pid {pid}"), e))?;
    if let Some(stopped) = stopped {
        stopped.kill();
    }
    Ok(Captured { procs, blob })
}

/// A tree criu left stopped (`--leave-stopped`) because the caller wants it gone after the
/// dump: killed once what the dump is for is done ([`StoppedTree::kill`]), and let run on
/// (`SIGCONT`) when it is dropped without that, so a capture that fails after the dump (a full
/// store, a bad write) never takes the process with it. Each process is held by a pidfd opened
/// while it is stopped (a stopped process cannot exit, so its pid names it), so neither signal
/// can reach a process that took a reused pid.
///
/// A pf killed before it could do either (SIGKILL, the OOM killer) leaves that to the guard
/// started before the dump ([`pf_os::guard`]): it lets the tree run on.
struct StoppedTree {
    root: i32,
    pidfds: Vec<(i32, Option<std::os::fd::OwnedFd>)>,
    guard: Option<pf_os::guard::ContinueOnDeath>,
}

impl StoppedTree {
    fn hold(root: i32, pids: &[i32], guard: Option<pf_os::guard::ContinueOnDeath>) -> Self {
        let pidfds = pids
            .iter()
            .map(|&p| (p, pf_os::fd::pidfd_open(p).ok()))
            .collect();
        Self {
            root,
            pidfds,
            guard,
        }
    }

    fn signal_all(&mut self, signal: nix::sys::signal::Signal) {
        for (pid, fd) in self.pidfds.drain(..) {
            let sent = match &fd {
                Some(fd) => {
                    use std::os::fd::AsFd as _;
                    pf_os::fd::pidfd_send_signal(fd.as_fd(), signal as i32)
                }
                None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
                    .map_err(std::io::Error::from),
            };
            if let Err(err) = sent {
                tracing::debug!(pid, %signal, error = %err, "signalling a process criu left stopped");
            }
        }
        // Dealt with: the guard has nothing left to do.
        if let Some(guard) = self.guard.take() {
            guard.disarm();
        }
    }

    /// Kill the tree: the dump is stored.
    fn kill(mut self) {
        self.signal_all(nix::sys::signal::Signal::SIGKILL);
    }
}

impl Drop for StoppedTree {
    fn drop(&mut self) {
        if !self.pidfds.is_empty() {
            tracing::warn!(
                pid = self.root,
                "the snapshot could not be stored, so the process was not killed: it runs on"
            );
            self.signal_all(nix::sys::signal::Signal::SIGCONT);
        }
    }
}

/// Stream the images directory into `store` as one deterministic tar (`procs.criu.v1`).
fn store_tar(
    store: &dyn BlobStore,
    pid: i32,
    images: &Path,
    progress: &mut dyn FnMut(CaptureProgress),
) -> Result<Digest256> {
    let mut tar = ImagesTar::new(images)?;
    let total = tar.len();
    progress(CaptureProgress::Storing { done: 0, total });
    let mut counting = Counting {
        inner: &mut tar,
        done: 0,
        total,
        last: 0,
        progress,
    };
    let put = store
        .put_reader_with_len(&mut counting, total)
        .map_err(|e| Error::store(format!("storing the images of pid {pid}"), e))?;
    (counting.progress)(CaptureProgress::Storing { done: total, total });
    tracing::info!(criu_dump = %put.digest, size = put.size, "images stored");
    Ok(put.digest)
}

fn store_placeholder(store: &dyn BlobStore, pid: i32, why: &Unavailable) -> Result<Captured> {
    let unsupported_on = match why {
        Unavailable::NotLinux { os } => os.clone(),
        _ => "linux-no-criu".to_owned(),
    };
    tracing::warn!(%why, "no usable criu: storing a procs.unsupported.v1 placeholder");
    let blob = ProcsBlob::Unsupported {
        unsupported_on,
        note: format!("nothing was dumped (would have dumped pid {pid}): {why}"),
    };
    let procs = store
        .put(&blob.to_json())
        .map_err(|e| Error::store("storing a procs.unsupported.v1 placeholder", e))?;
    Ok(Captured { procs, blob })
}

/// Wait (bounded by [`LAZY_WAIT`]) until no process of the tree `pids` has memory that a lazy
/// restore still serves: ranges registered with userfaultfd for missing pages (`um` in
/// `VmFlags`), which pf's lazy server unregisters when every page is in. CRIU dumps only the
/// pages present, so a copy frozen right after a lazy thaw would come back with zeros where
/// its pages were not in yet.
///
/// A tree that holds a userfaultfd itself serves its own memory (pf's lazy restores leave the
/// descriptor with pf): CRIU cannot dump that, and waiting would not change it, so it is refused
/// at once.
pub(crate) fn wait_for_lazy_memory(pids: &[i32]) -> Result<()> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        let pending = pids.iter().copied().find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/smaps"))
                .is_ok_and(|smaps| serves_missing_pages(&smaps))
        });
        let Some(pid) = pending else {
            return Ok(());
        };
        if let Some(&holder) = pids.iter().find(|&&p| holds_userfaultfd(p)) {
            return Err(Error::OwnUserfaultfd { pid: holder });
        }
        if start.elapsed() >= LAZY_WAIT {
            return Err(Error::LazyMemoryPending {
                pid,
                waited: start.elapsed(),
            });
        }
        tracing::debug!(
            pid,
            "waiting for a lazy restore to serve the rest of its memory"
        );
        std::thread::sleep(pause);
        // smaps of a large tree is not free to read: look less often as the wait goes on.
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether `pid` has a userfaultfd open (`anon_inode:[userfaultfd]` among its descriptors).
fn holds_userfaultfd(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
    })
}

/// Whether a `/proc/PID/smaps` text has a mapping registered with userfaultfd for missing
/// pages (`um` among its `VmFlags`).
fn serves_missing_pages(smaps: &str) -> bool {
    smaps.lines().any(|line| {
        line.strip_prefix("VmFlags:")
            .is_some_and(|flags| flags.split_whitespace().any(|f| f == "um"))
    })
}

/// Refuse a tree that holds this process: `pid` is pf or one of its ancestors (a shell that
/// started pf). criu refuses it only after attaching to every process, with one "The criu
/// itself is within dumped tree" line per process and a failed-run directory left behind.
fn ensure_not_ours(pid: i32) -> Result<()> {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let mut at = me;
    // A chain of parents ends at pid 1 (or 0 above it); bounded in case /proc changes under us.
    for _ in 0..4096 {
        if at == pid {
            let what = if at == me {
                "pf itself".to_owned()
            } else {
                format!("an ancestor of pf (pid {me})")
            };
            return Err(Error::HoldsPf { pid, what });
        }
        match pf_os::proc::stat(at) {
            Some(s) if s.ppid > 0 && s.ppid != at => at = s.ppid,
            _ => break,
        }
    }
    Ok(())
}

/// Refuse a tree a task of which another process traces: criu would fail to seize it with a
/// raw "Unable to interrupt task: N (Operation not permitted)" / "Unable to detach from N" (found
/// by hand: two `pf goblin freeze --pid N` at once). The tracer is most often the criu of another
/// freeze of the same process, which this names; a debugger or strace otherwise.
fn ensure_not_traced(pid: i32) -> Result<()> {
    match traced_in_tree(pid) {
        Some(traced) => Err(traced),
        None => Ok(()),
    }
}

/// [`Error::Traced`] for the first process of `root`'s tree one of whose tasks another process
/// traces, if any (without a source).
fn traced_in_tree(root: i32) -> Option<Error> {
    pf_os::proc::tree(root).into_iter().find_map(|pid| {
        let (tid, tracer) = pf_os::proc::traced_task(pid)?;
        let tracer_name = pf_os::proc::comm(tracer).unwrap_or_else(|| "a process".to_owned());
        // Another dump's criu: say whose (the pf that runs it).
        let tracer_parent = (tracer_name == "criu")
            .then(|| pf_os::proc::stat(tracer))
            .flatten()
            .filter(|s| s.ppid > 1)
            .and_then(|s| Some((s.ppid, pf_os::proc::comm(s.ppid)?)));
        Some(Error::Traced {
            root,
            pid,
            tid,
            tracer,
            tracer_name,
            tracer_parent,
            source: None,
        })
    })
}

/// criu's failure `err` to dump `root`'s tree, as [`Error::Traced`] when criu could not seize a
/// task and one is traced now (two freezes started at once: both passed
/// [`ensure_not_traced`], and the other one's criu seized the tree first). The wrapped criu error
/// keeps its lines and log but not its guess at the cause, which the outer error states. When no
/// task is traced any more (that freeze is over), `err` itself says that seizing was refused and
/// why it may have been.
fn traced_after(root: i32, err: Error) -> Error {
    if !matches!(err.criu_failure(), Some(CriuFailure::AlreadyTraced { .. })) {
        return err;
    }
    let Some(mut traced) = traced_in_tree(root) else {
        return err;
    };
    let err = match err {
        Error::Criu {
            action,
            exit,
            errors,
            log,
            ..
        } => Error::Criu {
            action,
            exit,
            failure: None,
            errors,
            log,
        },
        other => other,
    };
    if let Error::Traced { source, .. } = &mut traced {
        *source = Some(Box::new(err));
    }
    traced
}

/// The checks before CRIU runs: the pid is a live user process (CRIU's own failure on a kernel
/// thread is a page of log lines).
fn ensure_alive(pid: i32) -> Result<()> {
    if pid <= 0 || pid_state(pid) != PidState::Alive {
        return Err(Error::NoSuchProcess { pid });
    }
    if pf_os::proc::stat(pid).is_some_and(|s| s.is_kernel_thread()) {
        return Err(Error::KernelThread {
            pid,
            name: pf_os::proc::comm(pid).unwrap_or_default(),
        });
    }
    Ok(())
}

fn dump_with(
    criu: &Criu,
    pid: i32,
    images_dir: &Path,
    opts: &CaptureOptions,
    extra: &[OsString],
) -> Result<(DumpReport, Option<StoppedTree>)> {
    let images_dir =
        std::path::absolute(images_dir).map_err(|e| Error::io("resolve", images_dir, e))?;
    // Before the dump: afterwards (without leave_running) the tree is gone.
    let stdio = pf_os::proc::stdio_links(pid);
    let pids = pf_os::proc::tree(pid);
    // A thawed copy (in a pid namespace below ours) is dumped from inside its namespaces.
    let enter = crate::nsenter::Enter::of(pid)?;
    let tree = enter.as_ref().map_or(pid, |e| e.inner_pid);
    // criu never kills the tree itself: it leaves it stopped, and the caller kills it once the
    // dump is stored (or lets it run on when storing fails: a full disk must not take the
    // process with it). And criu inside a copy's pid namespace must not kill the tree: the
    // namespace's init exits with the copy's root, which kills every process left in there,
    // criu too, between its kill and its exit 0, with the images complete.
    let kill_after = !opts.leave_running;
    let mut args: Vec<OsString> = Vec::new();
    push_opt(&mut args, "--tree", tree.to_string());
    push_opt(&mut args, "--images-dir", &images_dir);
    for (on, flag) in [
        (opts.leave_running, "--leave-running"),
        (kill_after, "--leave-stopped"),
        (opts.shell_job, "--shell-job"),
        (opts.tcp_established, "--tcp-established"),
        (opts.ext_unix_sk, "--ext-unix-sk"),
        (opts.file_locks, "--file-locks"),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    args.extend(opts.extra_args.iter().map(OsString::from));
    args.extend(extra.iter().cloned());
    tracing::debug!(?pids, tree, "dumping");
    // Started before criu: killed while criu dumps, pf would leave the tree stopped just the
    // same, as criu finishes without it.
    let guard = kill_after
        .then(|| {
            pf_os::guard::ContinueOnDeath::start(&pids)
                .inspect_err(|err| {
                    tracing::warn!(
                        %err,
                        "cannot start the guard that lets the process run on if pf is killed"
                    );
                })
                .ok()
        })
        .flatten();
    let mut dump = Invocation::new(criu, "dump", args, &[], DUMP_DEADLINE)?.watching(pid);
    if let Some(enter) = &enter {
        // (A bare criu name is found on the PATH in there, as here.) A streamed dump's action
        // script too: criu runs it in there.
        let script = extra
            .iter()
            .position(|a| a == "--action-script")
            .and_then(|i| extra.get(i + 1))
            .map(Path::new);
        for path in [criu.path.as_path(), images_dir.as_path(), dump.work_dir()]
            .into_iter()
            .chain(script)
        {
            if path.is_absolute() {
                enter.check_sees(path)?;
            }
        }
    }
    dump.enter = enter;
    let work = match dump.run() {
        Ok(work) => work,
        Err(err) if pf_os::proc::has_ended(pid) => {
            return Err(Error::ExitedDuringDump {
                pid,
                source: Box::new(err),
            });
        }
        Err(err) => return Err(traced_after(pid, err)),
    };
    // The tree as criu dumped and left it, read again now: `pids` was read before the dump,
    // and a tree that forks (a shell loop's next `sleep`) may have more, or others, by the
    // time criu froze it. Stopped by criu, none of these can fork, exit or be reaped.
    let stopped = kill_after.then(|| StoppedTree::hold(pid, &pf_os::proc::tree(pid), guard));
    // criu writes `stats-dump` into its work directory (ours, removed when `work` drops), also
    // when it streams its images.
    let dump_stats = match crate::images::dump_stats(work.path()) {
        Ok(stats) => {
            tracing::debug!(
                frozen_us = stats.frozen_time_us,
                pages_written = stats.pages_written,
                "dump statistics"
            );
            Some(stats)
        }
        Err(err) => {
            tracing::warn!(error = %err, "criu left no readable dump statistics");
            None
        }
    };
    Ok((
        DumpReport {
            pids,
            stdio,
            criu_version: criu.version,
            dump_stats,
        },
        stopped,
    ))
}

pub(crate) use pf_os::scratch::Scratch;

/// A fresh private (0700) directory for images: under `$TMPDIR` when set, else on `/dev/shm`
/// (tmpfs: dumps and restores run at memory speed), else in `/tmp`; named
/// `<prefix><our pid>-…`, `flock`ed while in use, and made after sweeping the ones a killed pf
/// left behind (see `pf_os::scratch`).
pub(crate) fn scratch_dir(prefix: &str) -> Result<Scratch> {
    pf_os::scratch::images_dir(prefix).map_err(os_error)
}

/// A pf-os error as ours.
pub(crate) fn os_error(e: pf_os::Error) -> Error {
    match e {
        pf_os::Error::Io { op, path, source } => Error::io(op, path, source),
    }
}

/// Counts bytes through a reader and reports progress every 64 MiB.
struct Counting<'a> {
    inner: &'a mut dyn Read,
    done: u64,
    total: u64,
    last: u64,
    progress: &'a mut dyn FnMut(CaptureProgress),
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.last >= 64 << 20 {
            self.last = self.done;
            (self.progress)(CaptureProgress::Storing {
                done: self.done,
                total: self.total,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_a_lazy_restore_still_serves_is_seen_in_smaps() {
        let vma = |flags: &str| {
            format!(
                "7f0000000000-7f0000100000 rw-p 00000000 00:00 0\nSize:               1024 kB\n\
                 Rss:                   4 kB\nVmFlags: {flags}\n"
            )
        };
        assert!(!serves_missing_pages(&vma("rd wr mr mw me ac sd")));
        assert!(serves_missing_pages(&format!(
            "{}{}",
            vma("rd wr mr mw me ac sd"),
            vma("rd wr mr mw me ac sd um")
        )));
        // Write-protect tracking (`uw`) is not missing pages; a name is not a flag.
        assert!(!serves_missing_pages(&vma("rd wr uw")));
        assert!(!serves_missing_pages(
            "7f00-7f01 r--p 0 00:00 0 /tmp/um\nVmFlags: rd\n"
        ));
        // Our own memory is all in.
        let ours = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        assert!(!serves_missing_pages(&ours));
        assert!(wait_for_lazy_memory(&[std::process::id() as i32]).is_ok());
    }

    #[test]
    fn scratch_dirs_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = scratch_dir("pf-test-").expect("scratch");
        let mode = std::fs::metadata(d.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_kernel_thread_or_a_missing_pid_is_refused_before_criu_runs() {
        // kthreadd is pid 2 wherever /proc shows the host's kernel threads.
        if pf_os::proc::stat(2).is_some_and(|s| s.is_kernel_thread()) {
            let err = ensure_alive(2).expect_err("a kernel thread");
            assert!(matches!(err, Error::KernelThread { pid: 2, .. }), "{err}");
            assert!(err.to_string().contains("is a kernel thread"), "{err}");
        }
        let dead = crate::test_support::dead_pid();
        assert!(matches!(
            ensure_alive(dead),
            Err(Error::NoSuchProcess { .. })
        ));
        ensure_alive(std::process::id() as i32).expect("this process");
    }

    /// A tree traced by another process is refused before criu runs, naming the tracer; criu's
    /// failure to seize a task becomes the same error while a task is traced, and stays criu's
    /// own (saying why seizing fails) once nothing is. Needs root to trace (a live test).
    #[test]
    fn live_a_traced_tree_is_refused_naming_its_tracer() {
        use crate::test_support::{KillOnDrop, live, spawn_clean, trace};
        if !live("live_a_traced_tree_is_refused_naming_its_tracer") {
            return;
        }
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 600 & wait"])
            .stdin(std::process::Stdio::null());
        let mut sh = spawn_clean(&mut cmd).expect("spawn sh");
        let root = i32::try_from(sh.id()).expect("pid");
        let _root = KillOnDrop(root);
        // Its child, the sleep.
        let start = std::time::Instant::now();
        let child = loop {
            if let Some(&child) = pf_os::proc::children(root).first() {
                break child;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no sleep below {root}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let _child = KillOnDrop(child);
        ensure_not_traced(root).expect("nobody traces it yet");

        // A debugger on the child.
        let gdb = trace(child, "gdb").expect("trace the sleep");
        let err = ensure_not_traced(root).expect_err("traced");
        assert!(
            matches!(&err, Error::Traced { root: r, pid, tid, tracer, tracer_name, tracer_parent: None, source: None }
                if *r == root && *pid == child && *tid == child && *tracer == gdb.pid && tracer_name == "gdb"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "process {child} (of the tree of {root}) is traced by gdb (pid {})",
                gdb.pid
            )) && text.contains("detach it"),
            "{text}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::Traced);
        drop(gdb);

        // Another freeze's criu on the root.
        let criu = trace(root, "criu").expect("trace sh");
        let err = ensure_not_traced(root).expect_err("traced");
        let text = err.to_string();
        let me = std::process::id();
        assert!(
            text.starts_with(&format!(
                "process {root} is already being frozen: criu (pid {}, run by ",
                criu.pid
            )) && text.contains(&format!(", pid {me}) traces it")),
            "{text}"
        );
        // criu's failure to seize, mapped while the task is traced ...
        let criu_failed = |failure| Error::Criu {
            action: "dump",
            exit: crate::Exit::Code(1),
            failure,
            errors: vec![
                "Error (compel/src/lib/infect.c:417): Unable to detach from 1: No such process"
                    .to_owned(),
            ],
            log: std::path::PathBuf::from("/nonexistent/criu.log"),
        };
        let seize_failed = || criu_failed(Some(CriuFailure::AlreadyTraced { pid: root }));
        let err = traced_after(root, seize_failed());
        // (criu's lines and log kept, its guess at the cause left to the outer error)
        assert!(
            matches!(&err, Error::Traced { source: Some(s), .. }
                if matches!(&**s, Error::Criu { failure: None, log, errors, .. }
                    if log.ends_with("criu.log") && errors.len() == 1)),
            "{err:?}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::Traced);
        assert!(!err.to_string().contains("ptrace_scope"), "{err}");
        // ... and no other failure.
        let other = criu_failed(Some(CriuFailure::FileMissing));
        assert!(matches!(traced_after(root, other), Error::Criu { .. }));
        assert!(matches!(
            traced_after(root, criu_failed(None)),
            Error::Criu { .. }
        ));
        drop(criu);
        // Once nothing traces it, criu's error stays, and says why seizing may fail.
        let start = std::time::Instant::now();
        while pf_os::proc::traced_task(root).is_some() {
            assert!(start.elapsed() < Duration::from_secs(20), "still traced");
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = traced_after(root, seize_failed());
        assert!(matches!(err, Error::Criu { .. }), "{err:?}");
        assert_eq!(err.kind(), crate::ErrorKind::Traced);
        assert!(
            err.to_string().contains("another process was tracing it"),
            "{err}"
        );
        ensure_not_traced(root).expect("nobody traces it any more");
        drop(_child);
        let _ = sh.kill();
        let _ = sh.wait();
    }

    #[test]
    fn pf_itself_or_an_ancestor_is_refused_before_criu_runs() {
        let me = std::process::id() as i32;
        let err = ensure_not_ours(me).expect_err("this process");
        assert!(
            matches!(err, Error::HoldsPf { pid, .. } if pid == me),
            "{err}"
        );
        assert!(err.to_string().contains("pf itself"), "{err}");
        let parent = pf_os::proc::stat(me).expect("own stat").ppid;
        let err = ensure_not_ours(parent).expect_err("the parent");
        assert!(err.to_string().contains("an ancestor of pf"), "{err}");
        // A child of ours is neither.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start sleep");
        let result = ensure_not_ours(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        result.expect("a child is not an ancestor");
    }

    #[test]
    fn placeholder_says_why() {
        let store = pf_core::MemBlobStore::new();
        let why = Unavailable::EnvPathMissing {
            path: "/nonexistent/criu".into(),
        };
        let c = store_placeholder(&store, 42, &why).expect("placeholder");
        let ProcsBlob::Unsupported {
            unsupported_on,
            note,
        } = &c.blob
        else {
            panic!("expected Unsupported, got {:?}", c.blob);
        };
        assert_eq!(unsupported_on, "linux-no-criu");
        assert!(
            note.contains("$PF_CRIU") && note.contains("pid 42"),
            "{note}"
        );
        let stored: ProcsBlob =
            serde_json::from_slice(&store.get(&c.procs).expect("get")).expect("json");
        assert_eq!(stored, c.blob);
        let mac = store_placeholder(&store, 1, &Unavailable::NotLinux { os: "macos".into() })
            .expect("placeholder");
        assert!(
            matches!(mac.blob, ProcsBlob::Unsupported { unsupported_on, .. } if unsupported_on == "macos")
        );
    }

    #[test]
    fn images_dir_is_made_private_or_must_be_empty() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let new = tmp.path().join("a/b");
        prepare_images_dir(&new).expect("made");
        let mode = std::fs::metadata(&new).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        prepare_images_dir(&new).expect("empty is fine");
        std::fs::write(new.join("core-1.img"), b"x").expect("write");
        let err = prepare_images_dir(&new).expect_err("not empty");
        assert!(
            matches!(&err, Error::ImagesDirNotEmpty { path } if path == &new),
            "{err:?}"
        );
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = prepare_images_dir(&file).expect_err("a file");
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }
}
