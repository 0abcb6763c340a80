//! Private scratch directories that a killed pf cannot leave behind for long.
//!
//! A scratch directory is named `<prefix><pid>-<random>` (mode 0700, made with `mkdtemp`) and
//! holds an exclusive `flock` on itself while in use. Before making one, [`sweep_abandoned`]
//! removes the directories of the same prefix that a pf killed mid-way left (SIGKILL leaves no
//! chance to clean up): same owner, a pid that no longer runs here, and no lock held (the lock
//! also covers a pf in another pid namespace, whose pid means nothing here). Images are as large
//! as the process they hold and sit in memory on tmpfs, so this matters.
//!
//! Every sweep removes the abandoned directories of all of pf's own prefixes ([`PREFIXES`]) in
//! its base, not only of the prefix it makes: what a killed freeze left is gone after the next
//! thaw, though a thaw makes no directory of that prefix.
//!
//! A directory kept on purpose (a failed criu run's log) is renamed out of the swept prefix by
//! [`Scratch::keep_as`], and [`keep_newest`] bounds how many such directories stay.
//!
//! The directories in use are also listed in this process, so that a pf interrupted before its
//! work is done removes them itself ([`crate::abandon`]): its signal thread takes the list and
//! holds it to the end, and a directory is made, renamed to be kept, or let go of only while the
//! list is not held, so none escapes it.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::proc::{PidState, pid_state};

/// The prefixes of every scratch directory pf makes (the images of a dump, a restore or a beam,
/// a lazy restore's socket, the hold script of a streamed dump, a pagemap read, and criu's work
/// directories by action). Each sweep removes the abandoned directories of all of them.
pub const PREFIXES: &[&str] = &[
    "pf-restore-",
    "pf-lazy-",
    "pf-dump-",
    "pf-hold-",
    "pf-pagemaps-",
    "pf-beam-",
    "pf-criu-restore-",
    "pf-criu-dump-",
    "pf-criu-check-",
];

/// The scratch directories of this process in use (made and neither removed nor kept yet).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The list of [`LIVE`] directories (a panic elsewhere while it was held changes nothing in it).
pub(crate) fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Take `path` off the list of directories in use.
fn forget(live: &mut Vec<PathBuf>, path: &Path) {
    if let Some(i) = live.iter().rposition(|p| p == path) {
        live.swap_remove(i);
    }
}

/// A scratch directory, removed (with everything in it) when dropped, unless kept.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    lock: Option<File>,
}

impl Scratch {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep the directory: rename it to `<base>/<new_prefix><its pid and random part>`, release
    /// its lock and return the new path. Falls back to the old path when the rename fails.
    pub fn keep_as(mut self, new_prefix: &str, old_prefix: &str) -> PathBuf {
        let path = std::mem::take(&mut self.path);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let rest = name.strip_prefix(old_prefix).unwrap_or(name);
        let to = path.with_file_name(format!("{new_prefix}{rest}"));
        // Renamed while listed: a pf that is being interrupted removes it instead.
        let mut live = live();
        let kept = match std::fs::rename(&path, &to) {
            Ok(()) => to,
            Err(err) => {
                tracing::debug!(dir = %path.display(), %err, "cannot rename a kept directory");
                path.clone()
            }
        };
        forget(&mut live, &path);
        self.lock = None;
        kept
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        if let Err(err) = std::fs::remove_dir_all(&self.path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.path.display(), %err, "cannot remove a scratch directory");
        }
        // Listed until it is gone, so that an interrupted pf removes what is left of it.
        forget(&mut live(), &self.path);
    }
}

/// Where scratch images go: `$TMPDIR` when set, else `/dev/shm` (tmpfs: dumps and restores run
/// at memory speed) when it exists, else `/tmp`.
pub fn images_base() -> PathBuf {
    if std::env::var_os("TMPDIR").is_none_or(|v| v.is_empty()) && Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// A fresh private scratch directory for images in [`images_base`] (falling back to the temp
/// dir when that fails), after sweeping the abandoned ones of `prefix` there.
pub fn images_dir(prefix: &str) -> Result<Scratch> {
    let base = images_base();
    match scratch_in(&base, prefix) {
        Ok(dir) => Ok(dir),
        Err(_) if base != std::env::temp_dir() => scratch_in(&std::env::temp_dir(), prefix),
        Err(e) => Err(e),
    }
}

/// A fresh private scratch directory `<base>/<prefix><our pid>-XXXXXX`, locked, after sweeping
/// the abandoned ones of `prefix` and of pf's [`PREFIXES`] in `base`.
pub fn scratch_in(base: &Path, prefix: &str) -> Result<Scratch> {
    debug_assert!(
        PREFIXES.contains(&prefix) || prefix.starts_with("pf-test-"),
        "scratch prefix {prefix:?} is not in pf_os::scratch::PREFIXES: add it there, or what a \
         killed pf leaves of it is never swept"
    );
    sweep_abandoned_of(base, |name| {
        pid_in_name(name, prefix).or_else(|| PREFIXES.iter().find_map(|p| pid_in_name(name, p)))
    });
    let template = base.join(format!("{prefix}{}-XXXXXX", std::process::id()));
    // Made and listed at once: an interrupted pf removes every directory it made.
    let mut live = live();
    let path = nix::unistd::mkdtemp(&template)
        .map_err(|e| Error::io("create a scratch directory in", base, e.into()))?;
    let lock = match lock_dir(&path, false) {
        Ok(lock) => lock,
        Err(e) => {
            let _ = std::fs::remove_dir(&path);
            return Err(Error::io("lock the scratch directory", path, e));
        }
    };
    live.push(path.clone());
    Ok(Scratch {
        path,
        lock: Some(lock),
    })
}

/// An exclusive `flock` on the directory `path` (close-on-exec); `try_only`: fail at once when
/// someone holds it.
pub fn lock_dir(path: &Path, try_only: bool) -> std::io::Result<File> {
    let file = File::open(path)?;
    if try_only {
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::Error(e) => e,
            std::fs::TryLockError::WouldBlock => std::io::ErrorKind::WouldBlock.into(),
        })?;
    } else {
        file.lock()?;
    }
    Ok(file)
}

/// The pid in a scratch directory name `<prefix><pid>-…`.
pub fn pid_in_name(name: &str, prefix: &str) -> Option<i32> {
    let (pid, _) = name.strip_prefix(prefix)?.split_once('-')?;
    pid.parse().ok().filter(|&p| p > 0)
}

/// Remove the directories `<prefix><pid>-…` in `base` that we own, whose pid is gone and whose
/// lock nobody holds. Returns how many were removed.
pub fn sweep_abandoned(base: &Path, prefix: &str) -> usize {
    sweep_abandoned_of(base, |name| pid_in_name(name, prefix))
}

/// [`sweep_abandoned`] for the directories of `base` whose name `pid_of` gives a pid.
fn sweep_abandoned_of(base: &Path, pid_of: impl Fn(&str) -> Option<i32>) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let me = nix::unistd::geteuid().as_raw();
    let mut removed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(&pid_of) else {
            continue;
        };
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me || pid_state(pid) != PidState::Gone {
            continue;
        }
        // Held while we remove it, so a second sweeper skips it.
        let Ok(_held) = lock_dir(&path, true) else {
            continue;
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                removed += 1;
                tracing::info!(dir = %path.display(), pid, "removed a directory a killed pf left behind");
            }
            Err(err) => {
                tracing::debug!(dir = %path.display(), %err, "cannot remove an abandoned directory")
            }
        }
    }
    removed
}

/// Keep only the `keep` newest (by modification time) directories named `<prefix>…` in `base`
/// that we own and nobody holds locked; remove the older ones. Returns how many were removed.
pub fn keep_newest(base: &Path, prefix: &str, keep: usize) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let me = nix::unistd::geteuid().as_raw();
    let mut dirs: Vec<(i64, i64, OsString, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .as_encoded_bytes()
                .starts_with(prefix.as_bytes())
        })
        .filter_map(|e| {
            let meta = std::fs::symlink_metadata(e.path()).ok()?;
            (meta.is_dir() && meta.uid() == me).then(|| {
                let name = OsString::from_vec(e.file_name().into_encoded_bytes());
                (meta.mtime(), meta.mtime_nsec(), name, e.path())
            })
        })
        .collect();
    if dirs.len() <= keep {
        return 0;
    }
    dirs.sort_unstable_by(|a, b| b.cmp(a));
    let mut removed = 0;
    for (_, _, _, path) in dirs.into_iter().skip(keep) {
        let Ok(_held) = lock_dir(&path, true) else {
            continue;
        };
        if std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
            tracing::debug!(dir = %path.display(), "removed an old kept directory");
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn dead_pid() -> u32 {
        let mut dead = Command::new("true")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn true");
        let pid = dead.id();
        dead.wait().expect("reap");
        pid
    }

    fn test_base() -> PathBuf {
        let base = std::env::temp_dir().join(format!(
            "pf-os-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("mkdir");
        base
    }

    #[test]
    fn scratch_dirs_are_private_locked_and_removed() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = test_base();
        let d = scratch_in(&base, "pf-test-t-").expect("scratch");
        let path = d.path().to_owned();
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(
            pid_in_name(name, "pf-test-t-"),
            Some(std::process::id() as i32)
        );
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(lock_dir(&path, true).is_err(), "locked while in use");
        std::fs::write(path.join("x"), b"x").expect("write");
        drop(d);
        assert!(!path.exists());

        let d = scratch_in(&base, "pf-test-t-").expect("scratch");
        let kept = d.keep_as("pf-test-t-kept-", "pf-test-t-");
        assert!(kept.is_dir());
        assert!(
            kept.file_name()
                .and_then(|n| n.to_str())
                .expect("name")
                .starts_with("pf-test-t-kept-")
        );
        assert!(
            lock_dir(&kept, true).is_ok(),
            "a kept directory is unlocked"
        );
        std::fs::remove_dir_all(&base).expect("clean");
    }

    #[test]
    fn scratch_dirs_of_dead_pids_are_swept() {
        let base = test_base();
        let dead = dead_pid();
        let abandoned = base.join(format!("pf-test-x-{dead}-abc"));
        let ours = base.join(format!("pf-test-x-{}-abc", std::process::id()));
        let other = base.join(format!("pf-y-{dead}-abc"));
        let odd = base.join("pf-test-x-notapid-abc");
        for d in [&abandoned, &ours, &other, &odd] {
            std::fs::create_dir(d).expect("mkdir");
            std::fs::write(d.join("pages-1.img"), b"x").expect("write");
        }
        // A dead pid's directory that someone still holds (a pf in another pid namespace).
        let held = base.join(format!("pf-test-x-{dead}-held"));
        std::fs::create_dir(&held).expect("mkdir");
        let lock = lock_dir(&held, false).expect("lock");
        assert_eq!(sweep_abandoned(&base, "pf-test-x-"), 1);
        assert!(!abandoned.exists(), "a dead pid's directory is removed");
        assert!(ours.exists() && other.exists() && odd.exists());
        assert!(held.exists(), "a locked directory is in use");
        drop(lock);
        // Making a new one sweeps too. (A child another test thread forks at this moment holds
        // a copy of the lock's descriptor until its exec: try again for a moment.)
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while held.exists() && std::time::Instant::now() < end {
            drop(scratch_in(&base, "pf-test-x-").expect("scratch"));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!held.exists());
        std::fs::remove_dir_all(&base).expect("clean");
    }

    #[test]
    fn making_one_sweeps_every_prefix_of_pf_and_leaves_kept_ones() {
        let base = test_base();
        let dead = dead_pid();
        let dump = base.join(format!("pf-dump-{dead}-abc"));
        let lazy = base.join(format!("pf-lazy-{dead}-abc"));
        let kept = base.join(format!("pf-criu-failed-restore-{dead}-abc"));
        let foreign = base.join(format!("pf-other-{dead}-abc"));
        for d in [&dump, &lazy, &kept, &foreign] {
            std::fs::create_dir(d).expect("mkdir");
        }
        let made = scratch_in(&base, "pf-criu-restore-").expect("scratch");
        assert!(!dump.exists() && !lazy.exists(), "pf's prefixes are swept");
        assert!(kept.exists(), "a kept failure log stays");
        assert!(foreign.exists(), "a prefix that is not pf's stays");
        let path = made.path().to_owned();
        assert!(live().contains(&path), "listed while in use");
        drop(made);
        assert!(
            !path.exists() && !live().contains(&path),
            "removed and unlisted"
        );
        let made = scratch_in(&base, "pf-criu-restore-").expect("scratch");
        let path = made.path().to_owned();
        let kept = made.keep_as("pf-criu-failed-restore-", "pf-criu-restore-");
        assert!(kept.is_dir() && !live().contains(&path) && !live().contains(&kept));
        std::fs::remove_dir_all(&base).expect("clean");
    }

    #[test]
    fn only_the_newest_kept_directories_stay() {
        let base = test_base();
        for i in 0..6 {
            let d = base.join(format!("pf-failed-{i}"));
            std::fs::create_dir(&d).expect("mkdir");
            let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i);
            File::open(&d)
                .expect("open")
                .set_modified(when)
                .expect("mtime");
        }
        std::fs::create_dir(base.join("other-0")).expect("mkdir");
        let held = lock_dir(&base.join("pf-failed-0"), false).expect("lock");
        assert_eq!(
            keep_newest(&base, "pf-failed-", 3),
            2,
            "the locked oldest stays"
        );
        let mut left: Vec<String> = std::fs::read_dir(&base)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "other-0",
                "pf-failed-0",
                "pf-failed-3",
                "pf-failed-4",
                "pf-failed-5"
            ]
        );
        drop(held);
        // A child another test thread forks at this moment holds a copy of the lock's
        // descriptor until its exec: try again for a moment.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut removed = keep_newest(&base, "pf-failed-", 3);
        while removed == 0 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
            removed = keep_newest(&base, "pf-failed-", 3);
        }
        assert_eq!(removed, 1);
        std::fs::remove_dir_all(&base).expect("clean");
    }
}
