//! The procs wire format: the JSON blob that names a CRIU dump in the store.
//!
//! `{"kind":"procs.criu.v1","criu_dump":"sha256:…","pids":[…]}` is what the reference pf-world
//! writes; every other field is optional (serde defaults), so its blobs still read and ours stay
//! readable by it (unknown fields are ignored). `procs.unsupported.v1` is the honest placeholder
//! written where nothing could be dumped. These are the only serde types in this crate.

use std::collections::BTreeMap;

use pf_core::Digest256;
use serde::{Deserialize, Serialize};

/// A captured process tree, or the placeholder that says why there is none.
///
/// A [`CriuProcs`] with `memory` is written as `procs.criu.v2` (memory stored page by page),
/// one without as `procs.criu.v1` (the whole images directory in one tar); both read back as
/// [`ProcsBlob::Criu`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Tagged", into = "Tagged")]
#[allow(
    clippy::large_enum_variant,
    reason = "one blob per capture or restore: its size on the stack does not matter"
)]
pub enum ProcsBlob {
    /// A real CRIU dump (`procs.criu.v1` or `procs.criu.v2`).
    Criu(CriuProcs),
    /// Nothing was dumped: not Linux, or no working criu.
    Unsupported {
        /// `std::env::consts::OS`, or `linux-no-criu` on Linux without a usable criu.
        unsupported_on: String,
        /// Which check failed, and what to do.
        note: String,
    },
}

/// [`ProcsBlob`] as it is written: the `kind` tag says the format version.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind")]
#[allow(
    clippy::large_enum_variant,
    reason = "one blob per capture or restore: its size on the stack does not matter"
)]
enum Tagged {
    #[serde(rename = "procs.criu.v1")]
    V1(CriuProcs),
    #[serde(rename = "procs.criu.v2")]
    V2(CriuProcs),
    #[serde(rename = "procs.unsupported.v1")]
    Unsupported {
        unsupported_on: String,
        note: String,
    },
}

impl TryFrom<Tagged> for ProcsBlob {
    type Error = &'static str;

    fn try_from(tagged: Tagged) -> Result<Self, Self::Error> {
        match tagged {
            // A v1 reader never looked at `memory`: a v1 blob is whole without it.
            Tagged::V1(procs) => Ok(Self::Criu(CriuProcs {
                memory: None,
                ..procs
            })),
            Tagged::V2(procs) if procs.memory.is_none() => {
                Err("a procs.criu.v2 blob must have a \"memory\" field")
            }
            Tagged::V2(procs) => Ok(Self::Criu(procs)),
            Tagged::Unsupported {
                unsupported_on,
                note,
            } => Ok(Self::Unsupported {
                unsupported_on,
                note,
            }),
        }
    }
}

impl From<ProcsBlob> for Tagged {
    fn from(blob: ProcsBlob) -> Self {
        match blob {
            ProcsBlob::Criu(procs) if procs.memory.is_some() => Self::V2(procs),
            ProcsBlob::Criu(procs) => Self::V1(procs),
            ProcsBlob::Unsupported {
                unsupported_on,
                note,
            } => Self::Unsupported {
                unsupported_on,
                note,
            },
        }
    }
}

/// One pages file of a `procs.criu.v2` dump, stored page by page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesImage {
    /// The file's name in the images directory, e.g. `pages-1.img`.
    pub file: String,
    /// Its `pages.manifest.v1` blob (see `pf_core::pages`).
    pub manifest: Digest256,
    /// Pages in the file.
    pub pages: u64,
}

/// A CRIU dump in the store and what is known about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriuProcs {
    /// The deterministic tar of the images directory (with `memory`: of every file but the
    /// pages files).
    pub criu_dump: Digest256,
    /// The tree's pids at capture, root first.
    pub pids: Vec<i32>,
    /// The root's pid (the one `criu dump -t` was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_pid: Option<i32>,
    /// `criu --version` of the dumping criu, e.g. `4.1.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_version: Option<String>,
    /// `uname -r` of the dumping kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// `std::env::consts::ARCH`, e.g. `x86_64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Unix seconds when the dump finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_at: Option<u64>,
    /// The options the dump ran with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<DumpOptions>,
    /// `readlink /proc/<root>/fd/{0,1,2}` before the dump (`pipe:[1234]`, `/dev/null`, …); an
    /// empty string for a closed descriptor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stdio: Vec<String>,
    /// Free-form labels set by the capturer (pf-goblins sets `goblin = v1`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// CRIU's own statistics of the dump (absent when criu wrote none, and in older blobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_stats: Option<DumpStats>,
    /// `procs.criu.v2` only: the pages files, stored page by page (absent in v1 blobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Vec<PagesImage>>,
}

/// CRIU's statistics of one dump, from the `stats-dump` file it writes on success. Times are
/// microseconds, as CRIU measures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    /// Freezing the tree (cgroup freezer or ptrace seize).
    #[serde(default)]
    pub freezing_time_us: u64,
    /// How long the tree stood still: from frozen until criu let it run again (with
    /// `--leave-running`) or killed it. This is the process's pause.
    #[serde(default)]
    pub frozen_time_us: u64,
    /// Draining memory out of the tree into pipes.
    #[serde(default)]
    pub memdump_time_us: u64,
    /// Writing those pages into the images.
    #[serde(default)]
    pub memwrite_time_us: u64,
    /// Pages looked at.
    #[serde(default)]
    pub pages_scanned: u64,
    /// Pages left out because a parent (pre-)dump already holds them.
    #[serde(default)]
    pub pages_skipped_parent: u64,
    /// Pages written into the images.
    #[serde(default)]
    pub pages_written: u64,
    /// Pages left for lazy restore.
    #[serde(default)]
    pub pages_lazy: u64,
}

/// The `criu dump` options recorded in a [`CriuProcs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpOptions {
    /// `--leave-running`.
    #[serde(default)]
    pub leave_running: bool,
    /// `--shell-job`.
    #[serde(default)]
    pub shell_job: bool,
    /// `--tcp-established`.
    #[serde(default)]
    pub tcp_established: bool,
    /// `--ext-unix-sk`.
    #[serde(default)]
    pub ext_unix_sk: bool,
    /// `--file-locks`.
    #[serde(default)]
    pub file_locks: bool,
    /// Anything else passed to `criu dump`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

impl ProcsBlob {
    /// The blob's JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn reads_the_reference_pf_world_blobs() {
        let criu =
            format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{DIGEST}","pids":[1234,5678]}}"#);
        let blob: ProcsBlob = serde_json::from_str(&criu).expect("criu blob");
        let ProcsBlob::Criu(c) = &blob else {
            panic!("expected Criu, got {blob:?}");
        };
        assert_eq!(c.criu_dump.to_string(), DIGEST);
        assert_eq!(c.pids, vec![1234, 5678]);
        assert_eq!(
            (c.root_pid, c.options.is_none(), c.stdio.len()),
            (None, true, 0)
        );
        // Written back, it is byte-for-byte what the reference wrote.
        assert_eq!(String::from_utf8(blob.to_json()).expect("utf8"), criu);

        let unsupported = r#"{"kind":"procs.unsupported.v1","unsupported_on":"macos","note":"in-flight subprocess capture only available on Linux via CRIU; would have dumped pids=[1]"}"#;
        let blob: ProcsBlob = serde_json::from_str(unsupported).expect("unsupported blob");
        assert!(
            matches!(&blob, ProcsBlob::Unsupported { unsupported_on, .. } if unsupported_on == "macos")
        );
        assert_eq!(
            String::from_utf8(blob.to_json()).expect("utf8"),
            unsupported
        );
    }

    #[test]
    fn full_blob_round_trips_and_ignores_unknown_fields() {
        let blob = ProcsBlob::Criu(CriuProcs {
            criu_dump: DIGEST.parse().expect("digest"),
            pids: vec![7, 8],
            root_pid: Some(7),
            criu_version: Some("4.1.1".into()),
            kernel: Some("6.18.0".into()),
            arch: Some("x86_64".into()),
            captured_at: Some(1_700_000_000),
            options: Some(DumpOptions {
                leave_running: true,
                shell_job: false,
                tcp_established: false,
                ext_unix_sk: false,
                file_locks: true,
                extra_args: vec!["--link-remap".into()],
            }),
            stdio: vec!["pipe:[1]".into(), "pipe:[2]".into(), "/dev/null".into()],
            labels: BTreeMap::from([("goblin".to_owned(), "v1".to_owned())]),
            dump_stats: Some(DumpStats {
                freezing_time_us: 104,
                frozen_time_us: 16732,
                memdump_time_us: 314,
                memwrite_time_us: 90,
                pages_scanned: 58,
                pages_skipped_parent: 0,
                pages_written: 30,
                pages_lazy: 0,
            }),
            memory: None,
        });
        let json = blob.to_json();
        assert_eq!(
            serde_json::from_slice::<ProcsBlob>(&json).expect("back"),
            blob
        );
        let mut value: serde_json::Value = serde_json::from_slice(&json).expect("value");
        value["from_the_future"] = serde_json::json!(42);
        let again: ProcsBlob = serde_json::from_value(value).expect("unknown field ignored");
        assert_eq!(again, blob);
    }

    #[test]
    fn v2_blobs_carry_memory_and_say_so_in_their_kind() {
        let v2 = format!(
            r#"{{"kind":"procs.criu.v2","criu_dump":"{DIGEST}","pids":[7],"memory":[{{"file":"pages-1.img","manifest":"{DIGEST}","pages":3}}]}}"#
        );
        let blob: ProcsBlob = serde_json::from_str(&v2).expect("v2 blob");
        let ProcsBlob::Criu(c) = &blob else {
            panic!("expected Criu, got {blob:?}");
        };
        assert_eq!(c.memory.as_ref().map(Vec::len), Some(1));
        assert_eq!(String::from_utf8(blob.to_json()).expect("utf8"), v2);
        // v2 without memory is refused; v1 with a stray memory field is read as v1 (as a v1
        // reader would) and written back without it.
        let bare = format!(r#"{{"kind":"procs.criu.v2","criu_dump":"{DIGEST}","pids":[]}}"#);
        assert!(serde_json::from_str::<ProcsBlob>(&bare).is_err());
        let stray = v2.replace("procs.criu.v2", "procs.criu.v1");
        let blob: ProcsBlob = serde_json::from_str(&stray).expect("v1 blob");
        assert!(
            !String::from_utf8(blob.to_json())
                .expect("utf8")
                .contains("memory")
        );
    }

    #[test]
    fn rejects_unknown_kinds_and_bad_digests() {
        let wrong_kind = format!(r#"{{"kind":"procs.criu.v3","criu_dump":"{DIGEST}","pids":[]}}"#);
        assert!(serde_json::from_str::<ProcsBlob>(&wrong_kind).is_err());
        let bad = r#"{"kind":"procs.criu.v1","criu_dump":"sha256:xyz","pids":[]}"#;
        assert!(serde_json::from_str::<ProcsBlob>(bad).is_err());
    }
}
