//! Hints: small files under a store's `index/` ([`BlobStore::hint_path`]) that make later work
//! faster but are never trusted for content (which pages a thaw touched first, which manifest
//! last named a pack). Written privately and best effort, whole ([`write`]) or, for a digest, in
//! place ([`overwrite`]): a hint that is missing, stale or unreadable only costs speed.
//!
//! [`BlobStore::hint_path`]: crate::BlobStore::hint_path

use std::io::Write as _;
use std::path::Path;

use crate::digest::Digest256;
use crate::store::BlobStore;

/// Pages a lazy thaw touched first, by snapshot (`pf.hot_pages.v1`, pf-world-procs).
pub const HOT: &str = "hot";

/// Every kind of hint, each a file per key blob: gc removes those whose blob is gone.
pub const KINDS: &[&str] = &[HOT, crate::pages::MANIFEST_HINT];

/// Remove (or with `dry_run`, only count) the hints of [`KINDS`] whose key blob is not in
/// `store` any more. Returns how many.
pub fn sweep(store: &dyn BlobStore, dry_run: bool) -> crate::Result<usize> {
    let mut removed = 0;
    for kind in KINDS {
        let Some(dir) = store
            .hint_path(kind, &Digest256::of(b""))
            .and_then(|p| p.parent().map(Path::to_path_buf))
        else {
            continue;
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(crate::Error::io("listing hints", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| crate::Error::io("listing hints", &dir, e))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(".tmp-") {
                // A writer that died between writing and renaming: gone after an hour.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(3600));
                if old && !dry_run {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            }
            let Some(key) = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest256>().ok())
            else {
                continue;
            };
            if store.contains(&key)? {
                continue;
            }
            if !dry_run {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(crate::Error::io("removing a hint", entry.path(), e)),
                }
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// Write `bytes` to `path` atomically (a private temp file beside it, renamed over it),
/// creating the directory (private) when missing.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = path.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".tmp-{}-{seq}-hint", std::process::id()));
    let mut file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)?;
    let written = file.write_all(bytes);
    drop(file);
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Write `bytes` over the hint at `path` in place (created, with its directory, when missing),
/// without [`write`]'s temp file and rename: ext4 writes out a file renamed over another before
/// the rename returns (`auto_da_alloc`), 0.3 ms a hint against 6 µs in place, and a freeze
/// updates one hint per pack its snapshot uses (115 for a 1 GiB goblin's tenth snapshot: 23 ms
/// of its 0.9 s). Only for hints of one length whatever they say (a digest) whose reader checks
/// what they name: a reader racing the write, or a crash in it, sees the old bytes, the new
/// ones or a mix of both, which names no blob, so the guess is only missed. What is at `path`
/// and is not a private regular file of one link (a symlink, a directory, a file shared with a
/// hard-linked copy of the store, one this user cannot write) is replaced whole by [`write`].
pub fn overwrite(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _};
    let open = || {
        std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never waits on a FIFO planted there; a regular file ignores it.
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(path)
    };
    let opened = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt as _;
            let dir = path.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            open()
        }
        opened => opened,
    };
    let file = match opened {
        Ok(file) if file.metadata().is_ok_and(|m| m.is_file() && m.nlink() == 1) => file,
        _ => return write(path, bytes),
    };
    file.write_all_at(bytes, 0)?;
    if file.metadata()?.len() > bytes.len() as u64 {
        file.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gc_now(store: &crate::FsBlobStore) -> crate::GcReport {
        let options = crate::GcOptions {
            dry_run: false,
            grace: std::time::Duration::ZERO,
        };
        crate::gc(store, &options).expect("gc")
    }

    #[test]
    fn gc_sweeps_the_hints_of_blobs_that_are_gone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = crate::FsBlobStore::open(&tmp.path().join("store")).expect("store");
        let kept = store.put(b"kept").expect("put");
        let gone = Digest256::of(b"gone");
        for key in [&kept, &gone] {
            for kind in KINDS {
                let path = store.hint_path(kind, key).expect("hint path");
                write(&path, b"hint").expect("write");
            }
        }
        let report = gc_now(&store);
        // `kept` has no name, so gc removed it too: every hint goes.
        assert_eq!(report.hints_removed, 2 * KINDS.len());
        let kept = store.put(b"kept").expect("put");
        store.set_name("k", &kept).expect("name");
        for kind in KINDS {
            write(&store.hint_path(kind, &kept).expect("path"), b"hint").expect("write");
            write(&store.hint_path(kind, &gone).expect("path"), b"hint").expect("write");
        }
        let report = gc_now(&store);
        assert_eq!(report.hints_removed, KINDS.len());
        for kind in KINDS {
            assert!(store.hint_path(kind, &kept).expect("path").exists());
            assert!(!store.hint_path(kind, &gone).expect("path").exists());
        }
    }

    #[test]
    fn a_hint_overwritten_in_place_holds_the_new_bytes_only_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("index/kind/abc");
        overwrite(&path, b"a longer first").expect("write");
        overwrite(&path, b"second").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        overwrite(&path, b"third!").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"third!");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        assert_eq!(mode(&path), 0o600);
        // A symlink planted where the hint goes is not followed: it is replaced.
        let target = tmp.path().join("target");
        std::fs::write(&target, b"kept").expect("write");
        let planted = tmp.path().join("index/kind/planted");
        std::os::unix::fs::symlink(&target, &planted).expect("symlink");
        overwrite(&planted, b"x").expect("replaced");
        assert_eq!(std::fs::read(&target).expect("read"), b"kept");
        assert!(
            !std::fs::symlink_metadata(&planted)
                .expect("stat")
                .is_symlink()
        );
        assert_eq!(std::fs::read(&planted).expect("read"), b"x");
        // A hint shared with a hard-linked copy of the store is replaced, not written into.
        let copy = tmp.path().join("copy-of-abc");
        std::fs::hard_link(&path, &copy).expect("link");
        overwrite(&path, b"fourth").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"fourth");
        assert_eq!(std::fs::read(&copy).expect("read"), b"third!");
    }

    #[test]
    fn a_hint_replaces_the_last_one_whole_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("index/kind/abc");
        write(&path, b"first").expect("write");
        write(&path, b"second").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let mode = std::fs::metadata(path.parent().expect("dir"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(
            std::fs::read_dir(path.parent().expect("dir"))
                .expect("ls")
                .count(),
            1
        );
    }
}
