//! Restore: a procs blob → verified, safely extracted images → `criu restore` → a running tree
//! whose root (or whose namespace init) is our child.
//!
//! In the host pid namespace, `criu restore -d -S` makes the restored root a child of this
//! process, so [`Restored::wait`] gets its real exit status. The tree needs its original pids:
//! a zombie holding one is waited out (bounded), a live holder is an error that suggests
//! `new_pidns`. With `new_pidns`, the tree is restored inside fresh PID + mount namespaces under a
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

use crate::Exit;
use crate::error::{Error, Result};
use crate::nsinit;
use crate::proc::{PidState, pid_state};
use crate::runner::{Invocation, push_opt};
use crate::wire::{CriuProcs, ProcsBlob};

/// How long one `criu restore` may take before it is killed.
const RESTORE_DEADLINE: Duration = Duration::from_secs(300);
/// How long a zombie holding a pid we need may take to be reaped.
const ZOMBIE_WAIT: Duration = Duration::from_secs(10);
/// `PSTREE_MAGIC`: the second `u32` of `pstree.img`.
const PSTREE_MAGIC: u32 = 0x5027_3030;
/// `IMG_COMMON_MAGIC`: the first `u32` of every image.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;

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
    /// Descriptors to hand to the tree.
    pub inherit: Vec<InheritFd>,
    /// More arguments for `criu restore`.
    pub extra_args: Vec<String>,
}

/// A private directory of extracted images, removed on drop.
#[derive(Debug)]
pub struct ImagesDir {
    dir: crate::capture::Scratch,
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

/// Extract `procs`'s images through the store's verifying reader into a fresh private
/// directory (regular files with plain names only; see `tarball::extract`).
pub fn extract_images(store: &dyn BlobStore, procs: &CriuProcs) -> Result<ImagesDir> {
    let digest = &procs.criu_dump;
    let source = store
        .open(digest)
        .map_err(|e| Error::store(format!("opening the images {digest}"), e))?;
    let dir = crate::capture::scratch_dir("pf-restore-")?;
    crate::tarball::extract(source, digest, dir.path())?;
    tracing::debug!(%digest, dir = %dir.path().display(), "images extracted");
    Ok(ImagesDir { dir })
}

/// Restore the procs blob `procs` (a digest; resolve names with `BlobStore::resolve`).
pub fn restore(store: &dyn BlobStore, procs: &Digest256, opts: RestoreOptions) -> Result<Restored> {
    let _span = tracing::info_span!("restore", %procs).entered();
    match load_procs(store, procs)? {
        ProcsBlob::Criu(c) => {
            // Before extracting a GiB: is there a criu to hand it to?
            crate::criu::for_restore()?;
            let images = extract_images(store, &c)?;
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

/// Restore the tree whose CRIU images are in `images_dir`.
pub fn restore_dir(images_dir: &Path, opts: RestoreOptions) -> Result<Restored> {
    let criu = crate::criu::for_restore()?;
    let images_dir =
        std::path::absolute(images_dir).map_err(|e| Error::io("resolve", images_dir, e))?;
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
    drop(opts.inherit);
    let keep: Vec<RawFd> = inherit.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
    if !opts.new_pidns {
        let pids = pstree_pids(&images_dir)?;
        wait_for_free_pids(&pids)?;
    }
    let mut args: Vec<OsString> = Vec::new();
    push_opt(&mut args, "--images-dir", &images_dir);
    args.push("--restore-detached".into());
    args.push("--restore-sibling".into());
    if opts.shell_job {
        args.push("--shell-job".into());
    }
    for (fd, key) in &inherit {
        push_opt(
            &mut args,
            "--inherit-fd",
            format!("fd[{}]:{key}", fd.as_raw_fd()),
        );
    }
    args.extend(opts.extra_args.iter().map(OsString::from));
    // The pidfile goes into criu's work dir; its path is only known once the invocation exists,
    // so it is appended last.
    let mut inv = Invocation::new(criu, "restore", args, &keep, RESTORE_DEADLINE)?;
    // A shell job takes the session of criu's terminal: criu must have it on stdin.
    inv.stdin_is_ours = opts.shell_job;
    let pidfile = inv.work_dir().join("restore.pid");
    inv.args.push("--pidfile".into());
    inv.args.push(pidfile.clone().into());
    tracing::debug!(new_pidns = opts.new_pidns, "running criu restore");
    let restored = if opts.new_pidns {
        restore_in_new_pidns(inv, &keep, &pidfile)
    } else {
        restore_here(inv, &pidfile)
    };
    drop(inherit);
    let restored = restored?;
    tracing::info!(pid = restored.root, ns_pid = restored.ns_root, "restored");
    Ok(restored)
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
        detached: false,
    };
    if pid_state(root) != PidState::Alive {
        let status = match restored.try_wait() {
            Ok(Some(exit)) => exit.to_string(),
            _ => "gone".to_owned(),
        };
        restored.detached = true;
        return Err(Error::RestoredDied { pid: root, status });
    }
    Ok(restored)
}

fn restore_in_new_pidns(inv: Invocation, keep: &[RawFd], pidfile: &Path) -> Result<Restored> {
    let stdout = inv.stdio_file(inv.stdout_path())?;
    let stderr = inv.stdio_file(inv.stderr_path())?;
    let plan = nsinit::InitPlan {
        program: &inv.program,
        args: &inv.args,
        stdout: &stdout,
        stderr: &stderr,
        keep,
        pidfile,
        stdin_is_ours: inv.stdin_is_ours,
    };
    let init = nsinit::spawn(&plan).map_err(|source| Error::Sys {
        op: "starting an init in a new pid and mount namespace (needs root)",
        source,
    })?;
    drop((stdout, stderr));
    let init_pid = init.pid;
    let mut restored = Restored {
        root: 0,
        ns_root: 0,
        init: Some(init),
        exit: None,
        detached: false,
    };
    let first = match read_record(&mut restored, RESTORE_DEADLINE) {
        Ok(r) => r,
        Err(timed_out) => {
            let _ = restored.kill();
            restored.detached = true;
            if timed_out {
                return Err(Error::Timeout {
                    action: "restore",
                    after: RESTORE_DEADLINE,
                    log: inv.keep(),
                });
            }
            return Err(Error::Criu {
                action: "restore",
                status: "the namespace init died".to_owned(),
                errors: Vec::new(),
                log: inv.keep(),
            });
        }
    };
    let mut record = first;
    let mut setup_failure = None;
    while record.tag == nsinit::TAG_FAILED {
        setup_failure = Some(record);
        match read_record(&mut restored, Duration::from_secs(10)) {
            Ok(r) => record = r,
            Err(_) => break,
        }
    }
    if record.tag != nsinit::TAG_CRIU_DONE {
        let _ = restored.kill();
        restored.detached = true;
        let r = setup_failure.unwrap_or(record);
        return Err(Error::Namespace {
            step: nsinit::STEPS
                .get(r.a as usize)
                .copied()
                .unwrap_or("unknown step"),
            errno: r.b,
        });
    }
    let criu_exit = decode_wait_status(record.a);
    if criu_exit != Exit::Code(0) {
        let _ = restored.kill();
        restored.detached = true;
        if let Some(r) = setup_failure {
            let _ = inv.keep();
            return Err(Error::Namespace {
                step: nsinit::STEPS
                    .get(r.a as usize)
                    .copied()
                    .unwrap_or("unknown step"),
                errno: r.b,
            });
        }
        return Err(inv.conclude(criu_exit).err().unwrap_or(Error::Criu {
            action: "restore",
            status: criu_exit.to_string(),
            errors: Vec::new(),
            log: pidfile.to_owned(),
        }));
    }
    let ns_root = read_pidfile(pidfile)?;
    drop(inv.conclude(criu_exit)?);
    restored.ns_root = ns_root;
    // The root is the init's only child now (criu is reaped); find its host pid.
    let host = crate::proc::children(init_pid).into_iter().find(|&c| {
        std::fs::read_to_string(format!("/proc/{c}/status"))
            .ok()
            .and_then(|s| crate::proc::status_inner_pid(&s))
            == Some(ns_root)
    });
    match host {
        Some(root) if pid_state(root) == PidState::Alive => {
            restored.root = root;
            Ok(restored)
        }
        _ => {
            let status = match restored.wait() {
                Ok(exit) => exit.to_string(),
                Err(_) => "gone".to_owned(),
            };
            restored.detached = true;
            Err(Error::RestoredDied {
                pid: ns_root,
                status,
            })
        }
    }
}

/// Read one record from the init; `Err(true)` on timeout, `Err(false)` on EOF.
fn read_record(
    restored: &mut Restored,
    deadline: Duration,
) -> std::result::Result<nsinit::Record, bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    let Some(init) = restored.init.as_mut() else {
        return Err(false);
    };
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(true);
        }
        let timeout =
            PollTimeout::try_from(left.min(Duration::from_secs(60))).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(init.report.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Err(false),
        }
    }
    let mut buf = [0u8; 12];
    match init.report.read_exact(&mut buf) {
        Ok(()) => Ok(nsinit::Record::decode(&buf)),
        Err(_) => Err(false),
    }
}

/// A raw `waitpid` status as [`Exit`].
fn decode_wait_status(status: i32) -> Exit {
    if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(-1)
    }
}

/// Every pid and thread id in `pstree.img` (these must be free for a restore in our namespace).
fn pstree_pids(images_dir: &Path) -> Result<Vec<i32>> {
    let path = images_dir.join("pstree.img");
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    parse_pstree(&bytes).ok_or_else(|| {
        Error::io(
            "parse",
            &path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a criu pstree image"),
        )
    })
}

/// Parse `pstree.img`: magics, then `u32` length + `pstree_entry { pid=1 ppid=2 pgid=3 sid=4
/// repeated threads=5 }` records. Returns pids and thread ids, root first, deduplicated.
pub(crate) fn parse_pstree(img: &[u8]) -> Option<Vec<i32>> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(img.get(at..at + 4)?.try_into().ok()?))
    };
    if u32_at(0)? != IMG_COMMON_MAGIC || u32_at(4)? != PSTREE_MAGIC {
        return None;
    }
    let mut pos = 8;
    let mut out = Vec::new();
    let mut push = |v: u64| {
        if let Ok(v) = i32::try_from(v)
            && !out.contains(&v)
        {
            out.push(v);
        }
    };
    while pos < img.len() {
        let len = u32_at(pos)? as usize;
        pos += 4;
        let msg = img.get(pos..pos.checked_add(len)?)?;
        pos += len;
        let mut at = 0;
        while at < msg.len() {
            let key = varint(msg, &mut at)?;
            match (key >> 3, key & 7) {
                (1, 0) | (5, 0) => push(varint(msg, &mut at)?),
                (5, 2) => {
                    let n = varint(msg, &mut at)? as usize;
                    let end = at.checked_add(n)?;
                    let packed = msg.get(at..end)?;
                    let mut p = 0;
                    while p < packed.len() {
                        push(varint(packed, &mut p)?);
                    }
                    at = end;
                }
                (_, 0) => {
                    varint(msg, &mut at)?;
                }
                (_, 2) => {
                    let n = varint(msg, &mut at)? as usize;
                    at = at.checked_add(n).filter(|&e| e <= msg.len())?;
                }
                (_, 1) => at += 8,
                (_, 5) => at += 4,
                _ => return None,
            }
        }
    }
    Some(out)
}

fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Wait (bounded) for zombies holding our pids to be reaped; fail on a live holder.
fn wait_for_free_pids(pids: &[i32]) -> Result<()> {
    let start = Instant::now();
    loop {
        let mut zombie = None;
        for &pid in pids {
            match pid_state(pid) {
                PidState::Gone => {}
                PidState::Alive => {
                    let holder = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|s| s.trim().to_owned())
                        .unwrap_or_else(|_| "unknown".to_owned());
                    return Err(Error::PidInUse { pid, holder });
                }
                PidState::Zombie { ppid } => zombie = Some((pid, ppid)),
            }
        }
        let Some((pid, ppid)) = zombie else {
            return Ok(());
        };
        if start.elapsed() >= ZOMBIE_WAIT {
            return Err(Error::PidZombie {
                pid,
                ppid,
                waited: ZOMBIE_WAIT,
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
    detached: bool,
}

impl Restored {
    /// The root's pid as seen from this process's namespace.
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
        crate::proc::tree(self.root)
    }

    /// Wait for the root to exit; its real exit status.
    pub fn wait(&mut self) -> Result<Exit> {
        self.wait_inner(None)?.ok_or(Error::Sys {
            op: "waiting for the restored root",
            source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
        })
    }

    /// The root's exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<Exit>> {
        self.wait_inner(Some(WaitPidFlag::WNOHANG))
    }

    fn wait_inner(&mut self, flags: Option<WaitPidFlag>) -> Result<Option<Exit>> {
        if let Some(exit) = self.exit {
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
                        got = Some(decode_wait_status(r.a));
                    }
                }
                got.unwrap_or(exit)
            }
        };
        self.exit = Some(exit);
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
                let tree = crate::proc::tree(self.root);
                for pid in tree {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        self.wait().map(drop)
    }

    /// Leave the tree running, unwatched.
    ///
    /// The root (or init) stays our child: if this process keeps running, it lingers as a
    /// zombie after exiting until this process exits (then init reaps it). A CLI that detaches
    /// and exits at once leaves nothing behind.
    pub fn detach(mut self) {
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
    fn pstree_parses_a_real_image() {
        // pstree.img from CRIU 4.1.1: one process 23655 (pid, ppid 0, pgid, sid, one thread).
        let img = b"\x19\x43\x56\x54\x30\x30\x27\x50\x12\x00\x00\x00\x08\xe7\xb8\x01\
\x10\x00\x18\xe7\xb8\x01\x20\xe7\xb8\x01\x28\xe7\xb8\x01";
        assert_eq!(parse_pstree(img), Some(vec![23655]));
        assert_eq!(parse_pstree(&img[..20]), None);
        assert_eq!(parse_pstree(b"\0\0\0\0\x30\x30\x27\x50"), None);
    }

    #[test]
    fn pstree_reads_packed_threads_and_many_entries() {
        let mut img = b"\x19\x43\x56\x54\x30\x30\x27\x50".to_vec();
        // pid 10, threads packed [10, 11]
        let e1 = [0x08, 10, 0x10, 0, 0x2a, 2, 10, 11];
        // pid 12, ppid 10, thread 12
        let e2 = [0x08, 12, 0x10, 10, 0x28, 12];
        for e in [&e1[..], &e2[..]] {
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(e);
        }
        assert_eq!(parse_pstree(&img), Some(vec![10, 11, 12]));
    }

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(decode_wait_status(7 << 8), Exit::Code(7));
        assert_eq!(decode_wait_status(9), Exit::Signal(9));
    }

    #[test]
    fn free_and_taken_pids() {
        assert!(wait_for_free_pids(&[i32::MAX]).is_ok());
        let me = std::process::id() as i32;
        assert!(matches!(
            wait_for_free_pids(&[me]),
            Err(Error::PidInUse { pid, .. }) if pid == me
        ));
    }
}
