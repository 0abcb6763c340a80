//! Upload sessions kept on disk, so that a push cut off mid-blob continues the blob's upload
//! when it runs again instead of sending it whole: one small private file per blob upload in
//! progress (mode 0600 in a 0700 directory: its URL carries the registry's upload token),
//! written after every chunk the registry acknowledged, removed when the blob is committed or
//! the registry no longer knows the session.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use pf_core::Digest256;

use crate::error::{Error, Result};
use crate::manifest::{UPLOAD_SESSION_KIND, UploadSession};

/// A directory of upload session files (e.g. `<store>/registry/uploads`).
#[derive(Debug)]
pub(crate) struct Sessions {
    dir: PathBuf,
}

impl Sessions {
    /// The sessions in `dir`; the temp files of pushes that died while saving one (killed, or
    /// ended by a signal mid-save) are removed.
    pub(crate) fn new(dir: &Path) -> Self {
        let sessions = Self {
            dir: dir.to_owned(),
        };
        sessions.sweep_dead_temps();
        sessions
    }

    /// Remove `.<hex>.<pid>.tmp` files whose pid is no running process (its writer is gone; a
    /// live writer's, this process's included, stay).
    fn sweep_dead_temps(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.starts_with('.'))
                .and_then(|n| n.strip_suffix(".tmp"))
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                tracing::debug!(path = %entry.path().display(), "a dead push's temp file; removed");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The file of the upload of `digest` to `repository` at `registry`.
    fn path(&self, registry: &str, repository: &str, digest: &Digest256) -> PathBuf {
        let key = Digest256::of(format!("{registry}\n{repository}\n{digest}").as_bytes());
        self.dir.join(format!("{}.json", key.hex()))
    }

    /// The saved session of this upload, if there is one that is whole and about this blob. A
    /// file that cannot be read or parsed is no session (it is removed).
    pub(crate) fn load(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest256,
        size: u64,
    ) -> Option<UploadSession> {
        let path = self.path(registry, repository, digest);
        let bytes = std::fs::read(&path).ok()?;
        let session = serde_json::from_slice::<UploadSession>(&bytes)
            .ok()
            .filter(|s| {
                s.kind == UPLOAD_SESSION_KIND
                    && s.registry == registry
                    && s.repository == repository
                    && s.digest == *digest
                    && s.size == size
                    && s.offset <= size
            });
        if session.is_none() {
            tracing::debug!(path = %path.display(), "an unusable upload session file; removed");
            let _ = std::fs::remove_file(&path);
        }
        session
    }

    /// Save a session (atomically: a private temp file renamed over the old one).
    pub(crate) fn save(&self, session: &UploadSession) -> Result<()> {
        let path = self.path(&session.registry, &session.repository, &session.digest);
        let io = |source| Error::UploadSession {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let temp = self.dir.join(format!(
            ".{}.{}.tmp",
            session.digest.hex(),
            std::process::id()
        ));
        let bytes = serde_json::to_vec(session).expect("a session serialises");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|()| std::fs::rename(&temp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written.map_err(io)
    }

    /// Forget the session of this upload (done, or the registry no longer knows it).
    pub(crate) fn remove(&self, registry: &str, repository: &str, digest: &Digest256) {
        let path = self.path(registry, repository, digest);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "removing an upload session file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn temp_files_of_dead_pushes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let uploads = dir.path().join("uploads");
        std::fs::create_dir(&uploads).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let hex = Digest256::of(b"blob").hex();
        let of_dead = uploads.join(format!(".{hex}.{dead}.tmp"));
        let of_mine = uploads.join(format!(".{hex}.{}.tmp", std::process::id()));
        let session = uploads.join(format!("{hex}.json"));
        for f in [&of_dead, &of_mine, &session] {
            std::fs::write(f, b"{}").unwrap();
        }
        let _sessions = Sessions::new(&uploads);
        assert!(!of_dead.exists(), "a dead writer's temp file goes");
        assert!(
            of_mine.exists() && session.exists(),
            "a live writer's and sessions stay"
        );
    }

    #[test]
    fn saves_privately_loads_only_its_own_blob_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = Sessions::new(&dir.path().join("registry/uploads"));
        let digest = Digest256::of(b"blob");
        let session = UploadSession {
            kind: UPLOAD_SESSION_KIND.to_owned(),
            registry: "http://127.0.0.1:5000".into(),
            repository: "team/repl".into(),
            digest,
            size: 100,
            location: "http://127.0.0.1:5000/v2/team/repl/blobs/uploads/u?_state=x".into(),
            offset: 40,
        };
        sessions.save(&session).unwrap();
        let file = sessions.path(&session.registry, &session.repository, &digest);
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("registry/uploads"))
                .unwrap()
                .mode()
                & 0o777,
            0o700
        );
        let load = |repo: &str, size| sessions.load(&session.registry, repo, &digest, size);
        assert_eq!(load("team/repl", 100), Some(session.clone()));
        assert_eq!(load("other", 100), None);
        // A session for another size of the blob is not this upload's, and goes.
        assert_eq!(load("team/repl", 99), None);
        assert!(!file.exists());

        sessions.save(&session).unwrap();
        sessions.remove(&session.registry, &session.repository, &digest);
        assert!(!file.exists());
        std::fs::write(&file, b"not json").unwrap();
        assert_eq!(load("team/repl", 100), None);
        assert!(!file.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("registry/uploads"))
                .unwrap()
                .count(),
            0
        );
    }
}
