//! Restores of snapshots holding ghost files take turns, machine-wide.
//!
//! A *ghost file* is a file the tree had open after it was deleted (a Python tempfile, say).
//! CRIU dumps its contents into `ghost-file-<id>.img`; `criu restore` recreates it at
//! `<original path>.cr.<id hex>.ghost` (criu/files-reg.c `ghost_path`; a deleted directory at its
//! original path), opens it for the tasks, and unlinks it once the tree is rebuilt
//! (`depopulate_roots_yard`, after the memory is restored). That path depends on nothing but the
//! dump: not the images dir, the work dir, the pid or the namespace (pf's mount namespaces are
//! copies of the host's, on the same filesystems), and no `criu restore` option moves it
//! (`--ghost-limit` and `--ghost-fiemap` are for the dump, `--root` moves the whole tree). So two
//! restores of one snapshot at once, the copies of a `pf goblin fork` or two `pf goblin thaw`s,
//! collide: the second cannot create the file (`Can't create ghost regfile: File exists`) and,
//! rolling back, unlinks the first one's, whose own unlink then fails (`Couldn't unlink remap
//! …: No such file or directory`). Both restores fail. CRIU's own lock (`remap_open_lock`)
//! lives in one criu's shared memory.
//!
//! So a restore whose images hold a ghost file runs its `criu restore` under an exclusive `flock`
//! on one lock file for the machine ([`lock_path`]), taken by every pf process and every thread
//! (each opens the file itself, and `flock`s on separate opens exclude each other). The lock is
//! an open descriptor: a pf that dies lets go of it with its descriptors. It is close-on-exec,
//! so criu and the trees it restores never hold it (a namespace init, a fork of pf, closes every
//! descriptor it does not need right after starting criu). Restores of snapshots without ghost
//! files take no lock and stay fully concurrent.
//!
//! One lock for every ghost, not one per path: the paths are in `files.img`, which pf does not
//! parse, and restores holding ghost files are few and short (what serializing costs is about one
//! `criu restore` per copy; a lazy restore's memory comes later, outside the lock).
//!
//! What the lock cannot help: a criu killed mid-restore leaves its ghost behind, and every later
//! restore of the snapshot fails on it until it is removed (`criu_log` names that failure
//! `GhostInTheWay`, whose fix says so); and a pf killed while its criu runs lets go of the lock
//! before that criu is done (it finishes or is killed at its deadline), so a restore started
//! meanwhile can still collide with it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a restore waits for the lock before it gives up: a holder's criu is killed at its
/// own deadline, so only a stopped or hung pf holds it longer.
pub(crate) const WAIT: Duration = Duration::from_secs(360);
/// How often a waiting restore tries the lock again (a `criu restore` takes 100 ms or more).
const RETRY: Duration = Duration::from_millis(5);

/// The lock file: in `/run/pf` as root (emptied by a reboot, written only by root), else in the
/// user's runtime directory, else in the temp directory under the user's uid.
pub(crate) fn lock_path() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Path::new(crate::criu::CHECKED_DIR).join("ghost-restores.lock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("pf-ghost-restores.lock"),
        None => std::env::temp_dir().join(format!("pf-ghost-restores-{uid}.lock")),
    }
}

/// Held while one restore of a snapshot with ghost files runs; let go on drop.
#[derive(Debug)]
pub(crate) struct GhostLock {
    _file: File,
}

/// The lock a restore of `images_dir` must hold while criu runs: `Ok(None)` when its images hold
/// no ghost file, or when the lock file cannot be opened (then the restore runs unserialized, as
/// it did before, and only a concurrent one can fail). Waits at most [`WAIT`].
pub(crate) fn lock_if_ghosts(images_dir: &Path) -> Result<Option<GhostLock>> {
    let ghosts = match crate::images::ghost_files(images_dir) {
        Ok(0) => return Ok(None),
        Ok(n) => n,
        Err(e) => {
            // Unreadable here means criu will fail to read it too; serialize to be safe.
            tracing::debug!(error = %e, "cannot list the images: serializing the restore");
            1
        }
    };
    let path = lock_path();
    let file = match open(&path) {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot open the lock that serializes restores of snapshots holding deleted \
                 files: restoring without it (a concurrent restore of the same snapshot may fail \
                 with `Can't create ghost regfile: File exists`)"
            );
            return Ok(None);
        }
    };
    let waited = lock(&file, &path, WAIT)?;
    tracing::debug!(
        ghosts,
        lock = %path.display(),
        waited_ms = waited.as_millis(),
        "restore serialized: its images hold deleted (ghost) files, which criu recreates at \
         fixed paths"
    );
    Ok(Some(GhostLock { _file: file }))
}

/// Open (creating, 0600, its directory 0700) the lock file `path`; a symlink there is refused.
fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Take an exclusive `flock` on `file` (the lock file `path`), trying for at most `wait`; how
/// long it took.
fn lock(file: &File, path: &Path, wait: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(start.elapsed()),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < wait => {
                std::thread::sleep(RETRY);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::GhostLockBusy {
                    path: path.to_owned(),
                    waited: start.elapsed(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io("lock", path, e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_and_taken_once_let_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run").join("ghost-restores.lock");
        let holder = open(&path).expect("open the lock");
        lock(&holder, &path, Duration::ZERO).expect("free at first");
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().expect("parent")), 0o700);
        }

        // Another open of the same file, as another thread or pf process makes, must wait.
        let waiter = open(&path).expect("open again");
        let err = lock(&waiter, &path, Duration::from_millis(50)).expect_err("held");
        assert!(
            matches!(&err, Error::GhostLockBusy { path: p, waited } if *p == path && *waited >= Duration::from_millis(50)),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("lslocks"),
            "says what to do: {err}"
        );

        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(holder);
        });
        let waited = lock(&waiter, &path, Duration::from_secs(10)).expect("taken once let go");
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        released.join().expect("releaser");
    }

    #[test]
    fn a_symlink_in_place_of_the_lock_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        let path = dir.path().join("ghost-restores.lock");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let err = open(&path).expect_err("a symlink");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert!(!target.exists(), "nothing made through the link");
    }

    #[test]
    fn images_without_ghost_files_take_no_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["pstree.img", "files.img", "remap-fpath.img", "pages-1.img"] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        assert!(lock_if_ghosts(dir.path()).expect("no lock").is_none());
    }
}
