//! The one serialized type of this crate: `goblin.json`, written beside the CRIU images when a
//! goblin is frozen into a directory. (A goblin frozen into the store needs no file of its own:
//! its procs blob carries the stdio pipe ids and the label `goblin=v1`.)

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The metadata file's name inside an images directory. CRIU ignores files it does not know, so
/// the directory stays restorable with plain `criu restore --inherit-fd …`.
pub(crate) const META_FILE: &str = "goblin.json";

/// What `criu restore` alone cannot know about a goblin's images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub(crate) enum GoblinMeta {
    /// Version 1.
    #[serde(rename = "goblin.images.v1")]
    V1 {
        /// The pid the goblin had (and gets back inside its namespace).
        pid: i32,
        /// `readlink /proc/PID/fd/{0,1,2}` at freeze: `pipe:[N]` each.
        stdio: Vec<String>,
        /// Whether it was dumped with `--shell-job` (then restore needs it too).
        #[serde(default)]
        shell_job: bool,
        /// When it was frozen, in seconds since the Unix epoch.
        #[serde(default)]
        frozen_at: u64,
    },
}

impl GoblinMeta {
    /// Write the metadata into `dir`, next to the images.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(META_FILE);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| Error::Metadata {
            op: "encode",
            path: path.clone(),
            source: e.into(),
        })?;
        json.push(b'\n');
        std::fs::write(&path, json).map_err(|source| Error::Metadata {
            op: "write",
            path,
            source,
        })
    }

    /// Read the metadata of the images in `dir`.
    pub(crate) fn read(dir: &Path) -> Result<GoblinMeta> {
        // A directory that is not there is the news, not the file in it.
        if let Err(source) = std::fs::metadata(dir) {
            return Err(Error::Io {
                op: "open the images directory",
                path: dir.to_owned(),
                source,
            });
        }
        let path = dir.join(META_FILE);
        let json = std::fs::read(&path).map_err(|source| Error::Metadata {
            op: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&json).map_err(|e| Error::Metadata {
            op: "decode",
            path,
            source: e.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_its_kind_tag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = GoblinMeta::V1 {
            pid: 42,
            stdio: vec!["pipe:[1]".into(), "pipe:[2]".into(), "pipe:[3]".into()],
            shell_job: false,
            frozen_at: 1_700_000_000,
        };
        meta.write(dir.path()).expect("write");
        let text = std::fs::read_to_string(dir.path().join(META_FILE)).expect("read");
        assert!(text.contains(r#""kind": "goblin.images.v1""#), "{text}");
        assert_eq!(GoblinMeta::read(dir.path()).expect("read"), meta);
    }

    #[test]
    fn optional_fields_default_and_unknown_kinds_are_refused() {
        let v1: GoblinMeta =
            serde_json::from_str(r#"{"kind":"goblin.images.v1","pid":7,"stdio":[]}"#)
                .expect("decode");
        assert_eq!(
            v1,
            GoblinMeta::V1 {
                pid: 7,
                stdio: vec![],
                shell_job: false,
                frozen_at: 0
            }
        );
        assert!(
            serde_json::from_str::<GoblinMeta>(r#"{"kind":"goblin.images.v9","pid":7}"#).is_err()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            GoblinMeta::read(dir.path()),
            Err(Error::Metadata { op: "read", .. })
        ));
    }
}
